"""`spineseg-train` end to end on tiny synthetic films (CPU, subprocesses as a user runs it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spineseg.ensemble.store import PredictionStore

TINY = ["experiment=tiny", "hydra.job_logging.root.level=WARNING"]


def train(
    tmp_path: Path, *overrides: str, multirun: bool = False, **kw
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "spineseg.cli.train",
        *(["-m"] if multirun else []),
        *TINY,
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "SPINESEG_PROGRESS": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def test_single_run_writes_checkpoint_metrics_store_and_wandb_offline(tmp_path):
    res = train(tmp_path, "logger=many", "name=single")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "out" / "single" / "default"
    assert (run / "jobs" / "unet_lite0" / "checkpoints" / "last.ckpt").is_file()
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert Path(manifest["checkpoint"]).is_file()
    for key in ("test/dice", "external/dice", "test/iou"):
        assert 0.0 <= manifest["test_metrics"][key] <= 1.0
    assert 0.0 <= manifest["val_metrics"]["dice"] <= 1.0
    store = PredictionStore(run)
    truth = store.truth("test")
    probs = np.asarray(store.probs("unet_lite0", "test"))
    assert probs.dtype == np.float16 and probs.shape == (len(truth.ids), 1, 64, 64)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert (run / "splits.csv").is_file()
    assert "unet_lite0" in res.stdout and "external" in res.stdout  # the metrics table
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(p.suffix == ".wandb" for p in offline[0].iterdir())
    # re-running the same command skips the finished model
    again = train(tmp_path, "name=single", "hydra.job_logging.root.level=INFO")
    assert again.returncode == 0
    assert "predictions complete, skipping" in again.stdout + again.stderr
    assert (
        json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text()) == manifest
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.arch=Unett", "unknown architecture 'Unett'; valid choices:"),
        ("data.image_size=[100,64]", "multiples of 32"),
        ("data.source_kwargs.n=0", "yielded no films"),
        ("model.weights=/nonexistent/encoder.pth", "weight file not found"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, restore_logging, override, message):
    """In this process (the entry point's own `main`): the same error path, without paying
    for a fresh interpreter per case; the test below runs one case as a user does."""
    from spineseg.cli.train import main

    paths = [f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(SystemExit) as exit_:
        main([*TINY, *paths, override])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_bad_input_from_the_command_line_is_one_line_and_exit_1(tmp_path):
    res = train(tmp_path, "data.image_size=[100,64]")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "multiples of 32" in last


def test_unknown_preset_lists_choices(tmp_path):
    res = train(tmp_path, "model=unet_lite9")
    assert res.returncode != 0
    assert "unet_lite0" in res.stderr  # Hydra lists the available presets


def test_one_failed_model_does_not_sink_the_sweep(tmp_path):
    extra = tmp_path / "conf" / "model"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text(
        "name: broken\narch: Unet\nencoder: tu-efficientnet_lite0\nweights: /nope/enc.pth\n"
    )
    res = train(
        tmp_path,
        "name=iso",
        "model=broken,unet_lite0",
        "ensemble.enabled=false",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        multirun=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    store = PredictionStore(tmp_path / "out" / "iso" / "default")
    assert store.models() == ["unet_lite0"]
    failed = store.read_manifest("broken")
    assert failed["status"] == "failed" and "weight file not found" in failed["error"]
    summary = json.loads((store.root.parent / "sweep_summary.json").read_text())
    assert {r["model"]: r["status"] for r in summary} == {
        "broken": "failed",
        "unet_lite0": "complete",
    }
    assert "FAILED: broken" in res.stdout


def test_sigkill_mid_training_then_rerun_completes(tmp_path):
    args = (
        "name=resume",
        "model=unet_lite0,fpn_lite0",
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=null",
        "ensemble.enabled=false",
    )
    run = tmp_path / "out" / "resume" / "default"
    last = run / "jobs" / "unet_lite0" / "checkpoints" / "last.ckpt"
    cmd_env = {
        "start_new_session": True,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
    }
    cmd = [
        sys.executable,
        "-m",
        "spineseg.cli.train",
        "-m",
        *TINY,
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *args,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "SPINESEG_PROGRESS": "false"}, **cmd_env)
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = PredictionStore(run)
    assert store.read_manifest("unet_lite0")["status"] == "running"

    res = train(tmp_path, *args, multirun=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert store.models() == ["fpn_lite0", "unet_lite0"]
    manifest = store.read_manifest("unet_lite0")
    assert manifest["resumed_from"] and manifest["epochs"] == 4
    for model in store.models():
        for split in ("val", "test", "external"):
            probs = np.asarray(store.probs(model, split))
            assert np.isfinite(probs).all() and len(store.ids(model, split)) == len(probs)
    leftovers = [p for p in run.rglob("*.tmp")]
    assert not leftovers


def test_lightning_product_tips_are_filtered_from_job_logs():
    import logging

    import spineseg.train  # noqa: F401  (installs the filter)

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, (), None)

    assert not logger.filter(record("💡 Tip: For seamless cloud logging, try installing litlogger"))
    assert logger.filter(record("GPU available: False, used: False"))


def test_the_manifest_records_data_roots_as_absolute_paths(tmp_path, monkeypatch):
    """A root relative to where training ran must still lead to the films when the run is
    scored from another folder; the config hash (a run's identity) is untouched."""
    from omegaconf import OmegaConf

    from spineseg.identity import config_hash, recorded_config

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({
        "data": {"root": "films", "external": {"root": "../other"}}, "model": {}, "module": {},
        "seed": 0, "trainer": {"max_epochs": 1},
    })  # fmt: skip
    before = config_hash(cfg)
    got = recorded_config(cfg)
    assert got["data"]["root"] == str(tmp_path / "films")
    assert got["data"]["external"]["root"] == str(tmp_path.parent / "other")
    assert cfg.data.root == "films" and config_hash(cfg) == before
    none = recorded_config(OmegaConf.create({"data": {"root": None, "external": None}}))
    assert none["data"] == {"root": None, "external": None}
