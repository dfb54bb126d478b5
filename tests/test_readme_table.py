"""The README's rules table is generated from results.csv, number for number."""

from __future__ import annotations

import pandas as pd
from ensemble_fixtures import make_store

from spineseg.ensemble.evaluate import run_ensemble
from spineseg.report.readme_table import main, readme_table


def test_the_table_quotes_results_csv(tmp_path, capsys) -> None:
    make_store(tmp_path, models=("m0", "m1", "m2"), noise=[1.5, 2.0, 2.5])
    run_ensemble(tmp_path, {"n_boot": 50, "gallery_n": 0, "figures": False, "top_k": 3})
    results = pd.read_csv(tmp_path / "ensemble" / "results.csv")
    text = readme_table(results, ["test"], ["best_single", "soft"], levels=True)
    lines = text.splitlines()
    assert lines[0].startswith("| method | test Dice (n=5) | vs best | p | test level errors")
    soft = results.set_index(["split", "method"]).loc[("test", "soft")]
    assert lines[3].startswith(f"| soft | {soft['dice_mean']:.3f} ± {soft['dice_sd']:.3f}")
    assert f"{soft['rel_improvement_pct']:+.2f}%" in lines[3]
    assert len(lines) == 4 and "model:" not in text
    wide = readme_table(results, ["test"], ["best_single", "soft"], hd95=True, paired=True)
    head, _, best_row, soft_row = wide.splitlines()
    assert "test paired Δ Dice [95% CI]" in head and "test HD95 (mm)" in head
    diff = f"{soft['dice_diff_vs_best']:+.3f} [{soft['dice_diff_ci_low']:+.3f}, "
    assert diff in soft_row and f"| {soft['hd95_mean']:.1f} |" in soft_row
    assert "|  |  |  |" in best_row  # the best single model has no difference to itself
    assert main([str(tmp_path), "--splits", "test,external"]) == 0
    out = capsys.readouterr().out
    assert "external Dice (n=3)" in out and "| soft+spine |" in out
    assert main([str(tmp_path / "nowhere")]) == 1
    capsys.readouterr()
    assert main([str(tmp_path), "--splits", "val"]) == 1
    assert main([str(tmp_path), "--methods", "best_single,nope"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no 'val' split; there: test, external" in err[0]
    assert "no 'nope' in the test split; there: best_single, soft" in err[1]
