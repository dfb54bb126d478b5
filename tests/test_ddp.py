"""Data-parallel training on the CPU (gloo, 2 processes): one writer, every film once, and
the stored predictions are exactly what a single process predicts from the best checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spineseg.config import construct
from spineseg.ensemble.store import PredictionStore
from spineseg.models.module import SegmentationModule

REPO = Path(__file__).resolve().parents[1]
#: float16 storage: a probability is stored to within half an ulp at 1.0
TOLERANCE = 1e-3


def _train(tmp_path: Path, name: str, *extra: str) -> Path:
    cmd = [
        sys.executable, "-m", "spineseg.cli.train", *[a for a in extra if a == "-m"],
        "experiment=tiny", f"name={name}",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "hydra.job_logging.root.level=WARNING", *[a for a in extra if a != "-m"],
    ]  # fmt: skip
    env = {**os.environ, "SPINESEG_PROGRESS": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp_path / "out" / name / "default"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    # a one-job multirun: Lightning starts rank 1 by re-running the command line, which must
    # re-run this job, not the sweep
    ddp = ("-m", "model=unet_lite0", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    return {"ddp": _train(root, "ddp", *ddp), "root": root}


def test_ddp_stores_every_film_once_written_by_one_process(
    runs: dict[str, Path], compose_train
) -> None:
    run = runs["ddp"]
    store = PredictionStore(run)
    manifest = store.read_manifest("unet_lite0")
    assert manifest["status"] == "complete" and manifest["fit_processes"] == 2
    splits = pd.read_csv(run / "splits.csv")
    # what a single process of the same config loads, split and predicts, in that order
    cfg = compose_train("experiment=tiny", f"paths.cache_dir={runs['root'] / 'cache'}")
    single = construct(cfg.data)
    single.setup("fit")
    for split in ("val", "test", "external"):
        truth = store.truth(split)
        ids = store.ids("unet_lite0", split)
        assert len(set(ids.tolist())) == len(ids) == truth.n  # no padding duplicates
        np.testing.assert_array_equal(ids, truth.ids)
        if split != "external":
            assert sorted(ids) == sorted(splits.loc[splits["split"] == split, "id"])
        # same films, same order and shapes as a single process of the same config
        np.testing.assert_array_equal(ids, single.parts[split].ids)
        n = len(single.parts[split].ids)
        assert store.probs("unet_lite0", split).shape == (n, 1, *cfg.data.image_size)
    # the second process logged, but wrote nothing of its own, and the sweep ran once
    job = run / "jobs" / "unet_lite0"
    assert (job / "train_ddp_process_1.log").is_file()
    assert not list((run / "predictions").glob("*rank*"))
    assert sorted(p.name for p in (run / "jobs").iterdir()) == ["unet_lite0"]


def test_ddp_predictions_are_the_best_checkpoints_in_one_process(runs: dict[str, Path]) -> None:
    store = PredictionStore(runs["ddp"])
    manifest = store.read_manifest("unet_lite0")
    module = SegmentationModule.from_checkpoint(manifest["checkpoint"])
    truth = store.truth("test")
    from spineseg.data.transforms import GRAY_MEAN, GRAY_STD

    x = (torch.from_numpy(np.asarray(truth.images)).float() / 255.0 - GRAY_MEAN) / GRAY_STD
    with torch.inference_mode():
        expected = torch.sigmoid(module(x[:, None])).numpy()
    stored = np.asarray(store.probs("unet_lite0", "test"), dtype=np.float32)
    assert np.abs(stored - expected).max() <= TOLERANCE
    # The manifest's test Dice (torchmetrics, pooled over the split's pixels) is the Dice of
    # exactly these films: a padded duplicate would count a film twice and move it.
    labels, fg = stored[:, 0] > 0.5, np.asarray(truth.masks) > 0
    pooled = 2 * (labels & fg).sum() / (labels.sum() + fg.sum())
    assert manifest["test_metrics"]["test/dice"] == pytest.approx(pooled, abs=1e-4)
