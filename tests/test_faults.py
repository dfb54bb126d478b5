"""Finished work survives ordinary mistakes: a refused re-run changes nothing, and one job
folder has one writer at a time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spineseg.errors import RefusedError
from spineseg.train import _LOCKS, train
from spineseg.utils.io import hold_lock

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=tiny", "hydra.job_logging.root.level=WARNING"]


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "spineseg.cli.train", *TINY, "name=faults",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "SPINESEG_PROGRESS": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cfg(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=tiny", "name=faults", f"paths.output_dir={root / 'out'}",
                f"paths.cache_dir={root / 'cache'}", *overrides,
            ],
        )  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    assert train(_cfg(root))["status"] == "complete"  # in-process: saves a start-up
    for held in _LOCKS.values():  # as if that training's process had ended
        held.close()
    _LOCKS.clear()
    return root


def test_a_refused_rerun_leaves_the_finished_model_as_it_was(finished: Path) -> None:
    run = finished / "out" / "faults" / "default"
    before = _digest(run / "predictions")
    res = _train(finished, "module.optimizer.lr=0.5")  # another config, same run
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "trained with another config" in res.stderr
    assert _digest(run / "predictions") == before  # manifest, probabilities, truth untouched
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def test_one_job_folder_one_writer(finished: Path) -> None:
    job = finished / "out" / "faults" / "default" / "jobs" / "unet_lite0"
    held = hold_lock(job, "a test")  # as a training in another process would
    try:
        before = _digest(finished / "out" / "faults" / "default" / "predictions")
        with pytest.raises(RefusedError, match=f"{job} is in use by pid {os.getpid()}"):
            train(_cfg(finished, "overwrite=true"))
        assert _digest(finished / "out" / "faults" / "default" / "predictions") == before
    finally:
        held.close()
    first = hold_lock(job, "first")
    with pytest.raises(RefusedError, match="is in use"):
        hold_lock(job, "second")  # flock is per open file: even this process is refused
    first.close()
    hold_lock(job, "again").close()  # released: free to take


# ----------------------------------------------------------------------------- privacy
def test_wandb_goes_online_only_when_asked(monkeypatch, tmp_path):
    from spineseg.errors import ConfigError
    from spineseg.utils.wandb import wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key on the machine is not a request
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"
    assert wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "onlne")
    with pytest.raises(ConfigError, match="'onlne'; valid choices: disabled, offline, online"):
        wandb_mode()


def test_online_wandb_without_a_server_fails_in_one_line(monkeypatch):
    import socket
    import time

    from spineseg.errors import ConfigError
    from spineseg.utils.wandb import wandb_mode

    with socket.socket() as sock:  # a port that is certainly closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port} cannot be reached"):
        wandb_mode("online")
    assert time.monotonic() - start < 10
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc either
    with pytest.raises(ConfigError, match="no API key"):
        wandb_mode("online")


# ----------------------------------------------------------------------------- signals, disks
def _start(tmp_path: Path, *overrides: str, prelude: str = "") -> subprocess.Popen:
    """spineseg-train in its own process group; `prelude` runs first (a fault to inject)."""
    code = f"{prelude}\nfrom spineseg.cli.train import main\nmain()"
    cmd = [
        sys.executable, "-c", code, *TINY, "name=faults",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "SPINESEG_PROGRESS": "false"}
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def test_sigterm_marks_interrupted_exits_143_and_the_rerun_resumes(tmp_path: Path) -> None:
    import signal
    import time

    args = ("trainer.max_epochs=3", "trainer.limit_train_batches=null")
    run = tmp_path / "out" / "faults" / "default"
    last = run / "jobs" / "unet_lite0" / "checkpoints" / "last.ckpt"
    proc = _start(tmp_path, *args)
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the training finished before it could be signalled"
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does on pre-emption
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"

    res = _train(tmp_path, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed_from"].endswith(".ckpt")
    assert manifest["epochs"] == 3
    names = sorted(p.name for p in last.parent.iterdir())
    assert names == ["best.ckpt", "last.ckpt"], names  # no best-v1.ckpt, last-v1.ckpt


def test_sigint_raises_interrupted_with_exit_code_130() -> None:
    import signal

    from spineseg.errors import Interrupted, raise_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        raise_on_signals()
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
        assert info.value.exit_code == 130 and str(info.value) == "SIGINT"
        assert not isinstance(info.value, Exception)  # no `except Exception` swallows it
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_torn_checkpoint_is_moved_aside_and_the_previous_good_one_used(tmp_path) -> None:
    import torch

    from spineseg.train import resume_point

    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, tmp_path / "best.ckpt")
    good = (tmp_path / "best.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(good[: len(good) // 2])  # killed mid-write
    assert resume_point(tmp_path) == tmp_path / "best.ckpt"
    torn = list(tmp_path.glob("last.ckpt.torn-*"))
    assert len(torn) == 1 and torn[0].stat().st_size == len(good) // 2  # kept for inspection
    assert not (tmp_path / "last.ckpt").exists()
    (tmp_path / "best.ckpt").write_bytes(b"")
    assert resume_point(tmp_path) is None  # nothing good left: start afresh, no crash


_FULL_DISK = """
import errno, os
import lightning.fabric.plugins.io.torch_io as torch_io
def _full(checkpoint, path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
torch_io._atomic_save = _full
"""


def test_a_full_disk_is_one_line_and_recorded(tmp_path: Path) -> None:
    proc = _start(tmp_path, prelude=_FULL_DISK)
    _, err = proc.communicate(timeout=300)
    job = tmp_path / "out" / "faults" / "default" / "jobs" / "unet_lite0"
    assert proc.returncode == 1, err[-2000:]
    assert f"error: {job}: No space left on device" in err and "Traceback" not in err
    manifest = json.loads(
        (job.parents[1] / "predictions" / "unet_lite0" / "manifest.json").read_text()
    )
    assert manifest["status"] == "failed" and "No space left" in manifest["error"]
