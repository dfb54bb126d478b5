"""The `make demo` chain at a tiny size: ablation, a 3-model joblib sweep, the ensemble on
validation-selected models, and the report (the CI-sized variant of `make demo`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

RULES = {"best_single", "soft", "hard", "weighted", "max", "median"}


def test_tiny_study_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "spineseg.cli.study",
        "experiment=tiny",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.job_logging.root.level=WARNING",
    ]
    env = {**os.environ, "SPINESEG_PROGRESS": "false", "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "tiny" / "default"
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
