"""The `make demo` chain at a tiny size, as a coarse-to-fine cascade so that one run covers
both: stage 1 (`study.stage1`), ablation, a 3-model joblib sweep on stage 1's crops, the
ensemble on validation-selected models, and the report (the CI-sized variant of `make demo`)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_predict import film

from spineseg.predict import load_ensemble

RULES = {"best_single", "soft", "hard", "weighted", "max", "median"}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("study")
    cmd = [
        sys.executable,
        "-m",
        "spineseg.cli.study",
        "experiment=tiny",
        "data.crop={stage1:'${run_dir}/stage1'}",
        "study.stage1=['model=unet_lite0']",
        "study.film_scores=[val]",
        f"paths.output_dir={out}",
        f"paths.cache_dir={out / 'cache'}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.job_logging.root.level=WARNING",
    ]
    env = {**os.environ, "SPINESEG_PROGRESS": "false", "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / "tiny" / "default", res


def test_tiny_study_end_to_end(study):
    run, res = study
    summary = json.loads((run / "sweep_summary.json").read_text())
    assert sorted(r["model"] for r in summary if r["status"] == "complete") == [
        "fpn_lite0",
        "linknet_lite0",
        "unet_lite0",
    ]
    for v in ("none", "light"):
        manifest = (
            run / "ablation" / f"augment-{v}" / "predictions" / "unet_lite0" / "manifest.json"
        )
        assert json.loads(manifest.read_text())["status"] == "complete"
    results = pd.read_csv(run / "ensemble" / "results.csv")
    for split in ("test", "external"):
        assert set(results.loc[results.split == split, "method"]) >= RULES
    selection = json.loads((run / "ensemble" / "selection.json").read_text())
    assert len(selection["models"]) == 2  # experiment=tiny keeps the top 2 of 3
    report = (run / "report" / "report.md").read_text()
    assert "soft" in report and "augment" in report.lower()
    assert "report:" in res.stdout and "| soft" in res.stdout  # the printed results table


def test_the_cascade_trains_stage1_first_and_its_run_moves_as_one(study, tmp_path):
    """Stage 1 lands in <run_dir>/stage1, selected on validation only; the sweep trains on
    its crops; the run directory, stage 1 inside, still predicts after being moved."""
    run, _ = study
    stage1 = run / "stage1"
    assert sorted(p.name for p in (stage1 / "jobs").iterdir()) == ["unet_lite0"]
    with open(stage1 / "ensemble" / "results.csv") as fh:
        assert {r["split"] for r in csv.DictReader(fh)} == {"val"}  # stage 1 never reads test
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["config"]["data"]["crop"]["stage1"] == str(stage1)
    with open(run / "crops.csv") as fh:
        sources = {r["source"] for r in csv.DictReader(ln for ln in fh if ln[0] != "#")}
    assert sources <= {"truth", "stage1", "whole"} and "stage1" in sources

    moved = tmp_path / "elsewhere"
    shutil.copytree(run, moved)
    away = run.with_name("away")
    run.rename(away)  # nothing may read the run where it was trained
    try:
        ens = load_ensemble(moved, rule="soft")
        assert ens.pipeline.crop.stage1 == str(moved / "stage1")
        got = ens.predict(film(240, 100))
    finally:
        away.rename(run)
    assert got.labels.shape == (240, 100) and got.box is not None


def test_the_cascade_is_scored_on_the_whole_films_and_the_report_shows_it(study):
    """study.film_scores: predict's output, pasted back, against the full-resolution truth;
    kept on a re-run for the same selection (the report's Table 6)."""
    from spineseg.ensemble.store import PredictionStore

    run, res = study
    folder = run / "film_scores" / "val"
    meta = json.loads((folder / "results.json").read_text())
    selection = json.loads((run / "ensemble" / "selection.json").read_text())
    assert meta["selection_set_id"] == selection["set_id"] and meta["resolution"] == "film"
    per_image = pd.read_csv(folder / "per_image.csv")
    ids = [str(i) for i in PredictionStore(run).truth("val").ids]
    for method in ("best_single", "soft"):
        assert list(per_image.loc[per_image.method == method, "id"]) == ids
    assert per_image["dice"].between(0, 1).all()
    report = (run / "report" / "report.md").read_text()
    assert "Table 6. At the films' resolution" in report and "val (n = " in report
    assert "d') val at the films' resolution" in res.stdout


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["study.film_scores=[train]"], "study.film_scores=['train'] must be a list of splits"),
        (["study.stage1=[model=unet_lite0]"], "cannot parse the override"),
        (["study.stage1=['model=unet_lite0']"], "study.stage1 is set but data.crop.stage1 is not"),
        (["study.stage1=unet", "data.crop={stage1:nowhere}"], "must be a list of overrides"),
    ],
)
def test_a_bad_stage1_is_one_line_before_anything_runs(
    overrides, says, capsys, tmp_path, monkeypatch
) -> None:
    from spineseg.cli.study import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["experiment=tiny", *overrides])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and says in err, err
    assert not any(tmp_path.iterdir())  # nothing was trained or written
