"""`spineseg-ensemble` as a user runs it: a subprocess, Hydra overrides, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from ensemble_fixtures import make_store

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    return subprocess.run(
        [sys.executable, "-m", "spineseg.cli.ensemble", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_runs_with_overrides(tmp_path):
    run = tmp_path / "run"
    make_store(run, models=("m0", "m1", "m2"))
    work = tmp_path / "cwd"
    work.mkdir()
    proc = _cli(
        f"run_dir={run}",
        "ensemble.top_k=2",
        "ensemble.n_boot=50",
        "ensemble.figures=false",
        "ensemble.splits=[test]",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| best_single" in proc.stdout and str(run / "ensemble") in proc.stdout
    results = pd.read_csv(run / "ensemble" / "results.csv")
    assert set(results["split"]) == {"test"}
    assert (results.loc[results["method"] == "soft", "k"] == 2).all()
    assert json.loads((run / "ensemble" / "selection.json").read_text())["k"] == 2
    assert not list(work.iterdir())  # Hydra leaves nothing in the working directory


def _in_process(*args: str, capsys) -> tuple[int, str]:
    """The entry point's own `main` in this process: the same error path, no interpreter to
    start (the test above runs the command as a user does)."""
    from spineseg.cli.ensemble import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return int(exit_.value.code), capsys.readouterr().err


def test_cli_bad_run_dir_is_one_line(tmp_path, capsys, restore_logging):
    code, err = _in_process(f"run_dir={tmp_path / 'nope'}", capsys=capsys)
    assert code == 1
    assert err.strip().splitlines() == [f"error: run_dir {tmp_path / 'nope'} does not exist"]
    assert "Traceback" not in err
    assert not (tmp_path / "nope").exists()


def test_a_folder_beside_the_run_points_at_it(tmp_path, capsys, restore_logging):
    """A job, store or ensemble folder given as run_dir names the run it lies in; a
    name's folder (outputs/<name>) names the runs below it. Every command reads run
    directories the same way (spineseg.utils.paths.not_a_run)."""
    from spineseg.cli.predict import main as predict
    from spineseg.utils.paths import not_a_run

    run = tmp_path / "outputs" / "study" / "main"
    make_store(run, models=("m0",), sizes={"val": 2, "test": 2})
    (run / "jobs" / "m0").mkdir(parents=True)
    assert not_a_run(run) is None
    for inside in (run / "predictions", run / "jobs" / "m0"):
        code, err = _in_process(f"run_dir={inside}", capsys=capsys)
        assert code == 1 and err.strip().splitlines() == [
            f"error: {inside / 'predictions'} does not exist: no predictions in run_dir "
            f"{inside}; it lies inside the run {run}: run_dir={run}"
        ]
    (tmp_path / "outputs" / "study" / "other" / "predictions").mkdir(parents=True)
    above = tmp_path / "outputs"
    films = tmp_path / "films"
    films.mkdir()
    cv2.imwrite(str(films / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(SystemExit, match="1"):
        predict([f"run_dir={above}", f"input={films}", f"output={tmp_path / 'o'}"])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {above / 'predictions'} does not exist: no predictions in run_dir {above}; "
        f"runs below it: run_dir={run} (or one of 1 more)"
    ]


def test_cli_bad_option_is_one_line(tmp_path, capsys, restore_logging):
    make_store(tmp_path / "run", models=("m0",), sizes={"val": 2, "test": 2})
    code, err = _in_process(f"run_dir={tmp_path / 'run'}", "ensemble.rules=[soft,mean]",
                            capsys=capsys)  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: unknown voting rule 'mean'")


def test_a_cascade_is_told_where_its_whole_film_scores_come_from(tmp_path, capsys, restore_logging):
    from spineseg.cli.ensemble import main

    run = tmp_path / "run"
    make_store(run, models=("m0", "m1"), sizes={"val": 3, "test": 3})
    (run / "crops.csv").write_text("id,split,source\n")  # what a cascade's stage 2 records
    args = ["ensemble.n_boot=20", "ensemble.figures=false", "ensemble.splits=[test]"]
    assert main([f"run_dir={run}", *args]) == 0
    out = capsys.readouterr().out
    assert "these scores are inside each film's crop; `spineseg-score run_dir=" in out
