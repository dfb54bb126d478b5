"""`spineseg-ensemble` as a user runs it: a subprocess, Hydra overrides, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
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


def test_cli_bad_run_dir_is_one_line(tmp_path):
    proc = _cli(f"run_dir={tmp_path / 'nope'}", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: run_dir {tmp_path / 'nope'} does not exist"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "nope").exists()


def test_cli_missing_run_dir_and_bad_option(tmp_path):
    proc = _cli(cwd=tmp_path)
    assert proc.returncode == 1 and "run_dir is required" in proc.stderr
    assert "Traceback" not in proc.stderr
    make_store(tmp_path / "run", models=("m0",), sizes={"val": 2, "test": 2})
    proc = _cli(f"run_dir={tmp_path / 'run'}", "ensemble.rules=[soft,mean]", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown voting rule 'mean'")
