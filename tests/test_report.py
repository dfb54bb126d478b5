"""The report generator, its CLI and the results notebook, on a synthetic run directory
(no training): a store of noisy predictions + manifests, the real ensemble step on top."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ensemble_fixtures import make_store

from spineseg.ensemble.evaluate import run_ensemble
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import SpinesegError
from spineseg.report.report import build_report

REPO = Path(__file__).resolve().parents[1]
MODELS = ("m0", "m1", "m2", "m3")
PYTEST = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")
PNG = b"\x89PNG\r\n\x1a\n"
CONFIG = {
    "data": {"source": "synthetic", "image_size": [32, 32], "augment": "light", "target": "region"},
    "trainer": {"max_epochs": 3},
}


def _manifests(store: PredictionStore, models: tuple[str, ...], base: float) -> None:
    """Manifests with the metrics a real training run records (better for lower index)."""
    for i, model in enumerate(models):
        m = store.read_manifest(model) or {}
        store.write_manifest(
            model,
            {
                **m,
                "config": CONFIG,
                "val_metrics": {"dice": base - 0.05 * i, "iou": base - 0.1 - 0.05 * i},
                "test_metrics": {
                    "test/dice": base - 0.02 - 0.05 * i,
                    "test/iou": base - 0.12 - 0.05 * i,
                    "external/dice": base - 0.1 - 0.05 * i,
                    "external/iou": base - 0.2 - 0.05 * i,
                },
                "elapsed_s": 10.0 + i,
            },
        )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    store = make_store(root, models=MODELS)
    _manifests(store, MODELS, 0.9)
    store.write_manifest("m9", {"status": "failed", "error": "CUDA out of memory\nat step 3"})
    with pytest.warns(UserWarning, match="'m9' excluded"):
        run_ensemble(
            root,
            {"n_boot": 100, "top_k": 2, "rules": ["soft", "hard", "max"], "gallery_n": 2},
        )
    for value, base in (("none", 0.8), ("light", 0.85)):
        sub = root / "ablation" / f"augment-{value}"
        _manifests(make_store(sub, models=("m0",), seed=1), ("m0",), base)
    build_report(root)
    return root


def test_report_tables(run_dir: Path) -> None:
    md = (run_dir / "report" / "report.md").read_text()
    for model in (*MODELS, "m9"):
        assert f"| {model} " in md
    selected = [line for line in md.splitlines() if "✓" in line and line.startswith("|")]
    assert {line.split("|")[2].strip() for line in selected} == {"m0", "m1"}
    assert "CUDA out of memory at step 3" in md  # failure listed with its error, one line
    assert "**test (n = 5)**" in md and "**external (n = 3)**" in md
    for rule in ("soft", "hard", "max", "best_single"):
        assert f"| {rule} " in md
    assert "HD95 (mm)" in md  # unit from results.json (the store has a spacing)
    assert "light (main sweep)" in md and "| none " in md  # the augmentation table
    assert "validation split only" in md
    assert "| synthetic " in md and "32×32" in md


def test_report_figures_and_html(run_dir: Path) -> None:
    fig_dir = run_dir / "report" / "figures"
    names = {p.name for p in fig_dir.glob("*.png")}
    assert {"model_ranking.png", "rules_dice_ci.png", "per_image_test.png"} <= names
    assert {"gallery_test.png", "gallery_external.png"} <= names
    for p in fig_dir.glob("*.png"):
        assert p.read_bytes()[:8] == PNG
    page = (run_dir / "report" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(names)
    assert "<table" in page and "m9" in page


def test_report_degrades_without_ensemble_or_ablation(tmp_path: Path) -> None:
    store = make_store(tmp_path, models=("m0",))
    _manifests(store, ("m0",), 0.9)
    md = build_report(tmp_path).read_text()
    assert "ensemble step has not run" in md
    assert "ablation was not run" in md


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(SpinesegError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(SpinesegError, match="no predictions"):
        build_report(tmp_path)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spineseg.cli.report", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli(run_dir: Path, tmp_path: Path) -> None:
    ok = _cli(f"run_dir={run_dir}")
    assert ok.returncode == 0, ok.stderr
    assert str(run_dir / "report" / "report.md") in ok.stdout
    assert "soft" in ok.stdout and "external" in ok.stdout
    bad = _cli(f"run_dir={tmp_path / 'nope'}")
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")


def test_notebook_runs(run_dir: Path) -> None:
    env = {**os.environ, "SPINESEG_RUN_DIR": str(run_dir), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [*PYTEST, "--nbmake", "notebooks/results.ipynb"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
