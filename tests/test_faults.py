"""Finished work survives ordinary mistakes: a refused re-run changes nothing, and one job
folder has one writer at a time."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from spineseg.errors import RefusedError
from spineseg.train import _LOCKS, train
from spineseg.utils.io import hold_lock

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=tiny", "hydra.job_logging.root.level=WARNING"]


def _train(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "spineseg.cli.train", *(["-m"] if multirun else []), *TINY,
        "name=faults",
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
    _release_locks()
    return root


def _release_locks() -> None:
    """As if the in-process trainings' process had ended: their job folders are free."""
    for held in _LOCKS.values():
        held.close()
    _LOCKS.clear()


def test_a_refused_rerun_leaves_the_finished_model_as_it_was(finished: Path) -> None:
    run = finished / "out" / "faults" / "default"
    before = _digest(run / "predictions")
    res = _train(finished, "module.optimizer.lr=0.5")  # another config, same run
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "trained with another config (module.optimizer.lr: 0.001 -> 0.5)" in res.stderr
    assert _digest(run / "predictions") == before  # manifest, probabilities, truth untouched
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def test_an_option_added_by_an_upgrade_keeps_the_finished_model(finished, tmp_path) -> None:
    """A model recorded before an option existed (its manifest lacks the key, so its hash
    differs) is the same model while the option is at its package default: the rerun skips it
    and changes nothing. Set to anything else it is another config, and the refusal says so."""
    import shutil

    from spineseg.identity import identity_changes

    shutil.copytree(finished / "out", tmp_path / "out")
    predictions = tmp_path / "out" / "faults" / "default" / "predictions"
    path = predictions / "unet_lite0" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["data"]["preprocess"], manifest["config"]["module"]["threshold"]
    manifest["config_hash"] = "an-older-package"
    path.write_text(json.dumps(manifest))
    before = _digest(predictions)
    try:
        assert train(_cfg(tmp_path))["config_hash"] == "an-older-package"  # skipped
    finally:
        _release_locks()
    assert _digest(predictions) == before
    recorded = manifest["config"]
    assert identity_changes(recorded, _cfg(tmp_path)) == []
    assert identity_changes(recorded, _cfg(tmp_path, "data.preprocess=clahe")) == [
        'data.preprocess: (not set) -> "clahe"'
    ]
    assert identity_changes(recorded, _cfg(tmp_path, "data.batch_size=3", "seed=5")) == [
        "data.batch_size: 4 -> 3", "seed: 42 -> 5"
    ]  # fmt: skip


def test_answers_added_to_the_same_corrections_file_make_another_model(finished, tmp_path):
    """data.level_corrections names a file a reader keeps filling in: the model is what the
    file says, so a rerun after new answers is another config (refused, saying why), while a
    record from before digests were kept still counts as the same model."""
    from spineseg.identity import (
        config_hash,
        input_digests,
        recorded_changes,
        recorded_config,
        same_model,
    )

    manifest = json.loads(
        (finished / "out/faults/default/predictions/unet_lite0/manifest.json").read_text()
    )
    assert manifest["inputs"] == {}  # train() records what the files said (none here)
    review = tmp_path / "review.csv"
    review.write_text("patient,id,offset,expert_offset\np,a,1,1\np,b,-1,\n")
    cfg = _cfg(tmp_path, f"data.level_corrections={review}")
    trained = {"config": recorded_config(cfg), "config_hash": config_hash(cfg),
               "inputs": input_digests(cfg)}  # fmt: skip
    assert trained["inputs"]["data.level_corrections"]["films"] == 1
    assert same_model(trained, cfg, config_hash(cfg))
    review.write_text("patient,id,offset,expert_offset\np,a,1,1\np,b,-1,-1\n")  # b answered
    assert not same_model(trained, cfg, config_hash(cfg))
    assert recorded_changes(trained, cfg) == [
        "data.level_corrections: what the file says changed (1 -> 2 films)"
    ]
    older = {**trained, "config_hash": "an-older-package"}
    del older["inputs"]
    assert same_model(older, cfg, config_hash(cfg))


def test_only_a_model_with_something_to_lose_refuses_another_config(tmp_path: Path) -> None:
    """A finished model or one with a checkpoint is kept from another config; an attempt that
    stopped before its first checkpoint (the optimiser refused a value) lets the corrected
    command train."""
    from spineseg.train import _holds_training

    res = _train(tmp_path, "module.optimizer.lr=-1")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "error: module.optimizer (torch.optim.AdamW) refused its settings: "
        "ValueError: Invalid learning rate: -1"
    ]
    run = tmp_path / "out" / "faults" / "default"
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    try:  # the corrected command (in-process: saves a start-up): nothing was lost
        assert train(_cfg(tmp_path))["status"] == "complete"
    finally:
        _release_locks()
    manifest = json.loads((run / "predictions" / "unet_lite0" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["error"] is None

    job = tmp_path / "jobs" / "unet_lite0"
    failed = {"status": "failed", "error": "ConfigError: module.optimizer ... learning rate"}
    assert not _holds_training(failed, job) and _holds_training({"status": "complete"}, job)
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt.torn-20261203T110000").write_bytes(b"x")
    assert _holds_training(failed, job)  # even a torn checkpoint is kept for inspection


def test_one_job_folder_one_writer(finished: Path, restore_logging) -> None:
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


def test_lightnings_own_sigterm_exit_is_an_interruption_too(
    tmp_path: Path, monkeypatch, capsys, restore_logging
) -> None:
    """Lightning's loops end a fit on SIGTERM with `SIGTERMException`, a SystemExit without a
    code: uncaught, a pre-empted job would exit 0 as if it had finished."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import spineseg.train
    from spineseg.cli.train import main

    def pre_empted(cfg):
        raise SIGTERMException()

    monkeypatch.setattr(spineseg.train, "train", pre_empted)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as exit_:
            main([*TINY, "name=faults", f"paths.output_dir={tmp_path / 'out'}"])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert exit_.value.code == 143
    assert "interrupted by SIGTERM" in capsys.readouterr().err.strip().splitlines()[-1]
    store = tmp_path / "out" / "faults" / "default" / "predictions" / "unet_lite0"
    assert json.loads((store / "manifest.json").read_text())["status"] == "interrupted"


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
    import pandas as pd

    log = pd.read_csv(last.parents[1] / "logs" / "metrics.csv")
    assert {0, 1, 2} <= set(log["epoch"].dropna().astype(int))  # the first run's epoch 0 kept


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


# ----------------------------------------------------------------------------- sweeps
def test_a_sweep_over_a_non_model_option_gives_each_job_its_own_entry(tmp_path: Path) -> None:
    res = _train(
        tmp_path, "model=unet_lite0", "data.preprocess=none,clahe",
        "trainer.limit_train_batches=1", "ensemble.enabled=false", multirun=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "out" / "faults" / "default"
    names = ["unet_lite0+data.preprocess=clahe", "unet_lite0+data.preprocess=none"]
    assert sorted(p.name for p in (run / "jobs").iterdir()) == names
    from spineseg.ensemble.store import PredictionStore

    store = PredictionStore(run)
    assert store.models() == names  # both complete: one truth, shared (preprocessing differs)
    assert store.read_manifest(names[0])["config"]["data"]["preprocess"] == "clahe"


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (("member=fixed", "model=unet_lite0,fpn_lite0"), "'model=unet_lite0' and "
         "'model=fpn_lite0' would share jobs/fixed and its store entry"),
        (("model=unet_lite0", "data.image_size=[64,64],[96,64]"), "need different ground "
         "truths"),
    ],
)  # fmt: skip
def test_a_sweep_whose_jobs_would_collide_is_refused_before_anything_runs(
    tmp_path: Path, overrides: tuple[str, ...], said: str
) -> None:
    res = _train(tmp_path, *overrides, multirun=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert said in res.stderr and "(nothing was run)" in res.stderr
    assert not (tmp_path / "out" / "faults" / "default" / "predictions").exists()


# ----------------------------------------------------------------------------- the film cache
def test_the_film_cache_remembers_what_it_skipped_and_why(tmp_path: Path) -> None:
    """A cache built under on_error=skip replays its skipped list on every hit, and a run
    with on_error=raise never trains on the survivors: it gets its own key, and the error."""
    import test_folder as F

    from spineseg.data import datamodule as D
    from spineseg.errors import DataError

    root = tmp_path / "films"
    for stem, seed in (("a", 0), ("c", 2)):
        F.write(root / f"images/{stem}.png", F.film(seed))
        F.write(root / f"masks/{stem}.png", F.region_mask(255))
    (root / "images/c.png").write_bytes((root / "images/c.png").read_bytes()[:200])  # torn
    spec = {"source": "folder", "root": str(root)}

    def load(on_error: str) -> tuple[list, list]:
        skipped: list = []
        p = D.load_source(spec, (64, 64), "stretch", "none", "disk", str(tmp_path / "c"),
                          on_error=on_error, skipped=skipped)  # fmt: skip
        return p.ids, skipped

    ids, skipped = load("skip")
    assert ids == ["a"] and [Path(p).name for p, _ in skipped] == ["c.png"]
    D._MEMORY_CACHE.clear()  # a new process: the disk cache is hit, and says what it skipped
    ids_again, skipped_again = load("skip")
    assert ids_again == ids and skipped_again == skipped
    with pytest.raises(DataError, match=r"c\.png"):
        load("raise")


# ----------------------------------------------------------------------------- the store
def test_a_damaged_prediction_file_is_excluded_never_scored(finished: Path, tmp_path) -> None:
    import shutil

    from spineseg.ensemble.evaluate import candidate_models
    from spineseg.ensemble.store import PredictionStore

    run = tmp_path / "run"
    shutil.copytree(finished / "out" / "faults" / "default", run)
    store = PredictionStore(run)
    digests = store.read_manifest("unet_lite0")["digests"]
    assert digests.keys() == {f"{s}{v}" for s in ("val", "test", "external") for v in ("", "+flip")}
    assert candidate_models(store) == ["unet_lite0"]  # intact: verified, kept
    path = store.probs_path("unet_lite0", "test")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit inside the probabilities, headers intact
    path.write_bytes(bytes(raw))
    assert np.asarray(store.probs("unet_lite0", "test")).shape[0] > 0  # still opens
    with pytest.warns(UserWarning, match=f"'unet_lite0' excluded: {path}: damaged"):
        assert candidate_models(store) == []


# ----------------------------------------------------------------------------- output sets
def test_a_kill_mid_ensemble_leaves_the_old_complete_set(tmp_path, monkeypatch) -> None:
    from ensemble_fixtures import make_store

    from spineseg.ensemble import evaluate
    from spineseg.report.report import ReportError, build_report

    make_store(tmp_path, models=("m0", "m1", "m2"), noise=[1.5, 2.0, 2.5])
    opts = {"n_boot": 50, "gallery_n": 0, "top_k": 2, "figures": False}
    evaluate.run_ensemble(tmp_path, opts)
    build_report(tmp_path)
    before = {d: _digest(tmp_path / d) for d in ("ensemble", "report")}

    def killed(*args, **kwargs):  # dies after selection.json of the new set is written
        raise KeyboardInterrupt

    from spineseg.report import outputs

    monkeypatch.setattr(outputs, "write_results", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_ensemble(tmp_path, {**opts, "top_k": 3})
    monkeypatch.undo()
    assert _digest(tmp_path / "ensemble") == before["ensemble"]  # old set, whole
    assert not list(tmp_path.glob(".ensemble*"))  # the staged set is gone

    from spineseg.report import report as R

    monkeypatch.setattr(R, "_html", killed)
    with pytest.raises(KeyboardInterrupt):
        build_report(tmp_path)
    monkeypatch.undo()
    assert _digest(tmp_path / "report") == before["report"]

    selection = json.loads((tmp_path / "ensemble" / "selection.json").read_text())
    results = json.loads((tmp_path / "ensemble" / "results.json").read_text())
    assert selection["set_id"] == results["set_id"]
    selection["set_id"] = "0" * 32  # a selection from another ensemble run
    (tmp_path / "ensemble" / "selection.json").write_text(json.dumps(selection))
    with pytest.raises(ReportError, match="come from different ensemble runs"):
        build_report(tmp_path)


def test_where_paths_cannot_be_exchanged_two_renames_and_a_recovery_do(
    tmp_path, monkeypatch
) -> None:
    from spineseg.utils import io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # e.g. NFS: no RENAME_EXCHANGE
    final = tmp_path / "ensemble"
    for value in ("1", "2"):
        with io.staged_dir(final) as out:
            (out / "results.csv").write_text(value)
    assert (final / "results.csv").read_text() == "2"
    assert not list(tmp_path.glob(".ensemble*"))
    os.replace(final, tmp_path / ".ensemble.old")  # killed between the two renames
    (tmp_path / ".ensemble.new-x").mkdir()
    io.recover_dir(final)  # what the next writer does first
    assert (final / "results.csv").read_text() == "2"
    assert not list(tmp_path.glob(".ensemble*"))


# ----------------------------------------------------------------------------- predict
def test_predict_refuses_a_pickled_checkpoint_and_writing_into_the_input(
    tmp_path, capsys, restore_logging
) -> None:
    import cv2
    import torch
    from test_predict import film, make_run

    from spineseg.cli.predict import main as predict
    from spineseg.ensemble.store import StoreError
    from spineseg.predict import load_ensemble

    run = make_run(tmp_path / "run")
    films = tmp_path / "films"
    films.mkdir()
    cv2.imwrite(str(films / "a.png"), film(40, 30))
    with pytest.raises(SystemExit) as info:
        predict([f"run_dir={run}", f"input={films}", f"output={films}/."])
    assert info.value.code == 1 and "is the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in films.iterdir()) == ["a.png"]  # nothing written there

    ckpt = run / "jobs" / "m1" / "best.ckpt"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "extra": Path("code")}, ckpt)  # a pickled object: never unpickled
    with pytest.raises(StoreError, match=f"{ckpt}: not a plain checkpoint"):
        load_ensemble(run)


def test_predict_into_a_folder_of_other_predictions_is_refused(
    tmp_path, capsys, restore_logging
) -> None:
    """A second predict into a folder with another run, rule or input would replace some
    masks, keep others and rewrite predictions.csv without the first films: refused, nothing
    touched. The same command replaces its own set; overwrite=true replaces any; a folder of
    masks nobody can trace (the user's own) is refused too; a failed first attempt holds
    nothing."""
    import cv2
    from test_predict import film, make_run

    from spineseg.cli.predict import main as predict

    run = make_run(tmp_path / "run")
    batches = {}
    for name, seed in (("week1", 0), ("week2", 1)):
        batches[name] = tmp_path / name
        batches[name].mkdir()
        cv2.imwrite(str(batches[name] / f"{name}.png"), film(80, 70, seed=seed))
    out = tmp_path / "masks"
    common = ["progress=false", "overlay=false"]

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as info:
            predict([*args, *common])
        err = capsys.readouterr().err
        assert info.value.code == 1 and len(err.strip().splitlines()) == 1, err
        return err

    refused(f"run_dir={tmp_path / 'nope'}", f"input={batches['week1']}", f"output={out}")
    assert predict([f"run_dir={run}", f"input={batches['week1']}", f"output={out}", *common]) == 0
    assert predict([f"run_dir={run}", f"input={batches['week1']}", f"output={out}", *common]) == 0
    before = _digest(out)
    err = refused(f"run_dir={run}", f"input={batches['week2']}", f"output={out}")
    assert f"output {out} already holds the predictions of another ensemble or input" in err
    assert f"input: {batches['week1']} -> {batches['week2']}" in err and "overwrite=true" in err
    assert "rule: soft -> hard" in refused(
        f"run_dir={run}", f"input={batches['week1']}", f"output={out}", "rule=hard"
    )
    assert _digest(out) == before
    args = [f"run_dir={run}", f"input={batches['week2']}", f"output={out}", "overwrite=true"]
    assert predict([*args, *common]) == 0
    with open(out / "predictions.csv") as fh:
        assert [row["file"] for row in csv.DictReader(fh)] == ["week2.png"]

    theirs = tmp_path / "annotations"
    theirs.mkdir()
    cv2.imwrite(str(theirs / "week1_mask.png"), film(80, 70))
    err = refused(f"run_dir={run}", f"input={batches['week1']}", f"output={theirs}")
    assert "masks whose origin is unknown (no readable predict.json)" in err
    assert sorted(p.name for p in theirs.iterdir()) == ["week1_mask.png"]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("data.batch_size=0", "data.batch_size must be a whole number >= 1, got 0"),
        ("data.batch_size=2.5", "data.batch_size must be a whole number >= 1, got 2.5"),
        ("data.num_workers=-2", "data.num_workers must be auto or a whole number >= 0"),
        ("ensemble.top_k=0", "ensemble.top_k must be a whole number >= 1, got 0"),
        ("ensemble.chunk_size=x", "ensemble.chunk_size must be a whole number >= 1, got 'x'"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be a whole number >= 1"),
        ("model.encoder=nope", "unknown encoder 'nope'; valid choices:"),
        ("model.arch=nope", "unknown architecture 'nope'; valid choices:"),
    ],
)
def test_a_bad_value_is_one_line_before_any_data_loads(tmp_path, override, said) -> None:
    from spineseg.checks import check_run
    from spineseg.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        check_run(_cfg(tmp_path, override))
    assert said in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()  # checked before a single film was decoded


def test_a_dataset_folder_that_does_not_exist_is_one_line_before_anything_runs(
    tmp_path, monkeypatch
) -> None:
    from spineseg.checks import check_run
    from spineseg.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        check_run(_cfg(tmp_path, "data=folder", "data.root=films", "data.external=null"))
    assert str(info.value) == (
        f"data.root=films does not exist (a relative path is read from {tmp_path}); "
        "set data.root to the folder of your folder data"
    )
    with pytest.raises(ConfigError, match=r"^data\.external\.root=/no/such/site does not exist; "):
        check_run(_cfg(tmp_path, "+data.external.root=/no/such/site"))
    with pytest.raises(ConfigError) as info:
        check_run(_cfg(tmp_path, "data.level_corrections=review.csv"))
    assert str(info.value) == (
        f"data.level_corrections=review.csv is not a file (a relative path is read from "
        f"{tmp_path}); write it with spineseg-validate-data review=<dir> or level_offsets=<csv>"
    )


def test_a_gpu_sweep_without_a_gpu_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    """trainer=gpu on a machine whose torch sees no GPU stops the sweep before the first job
    (not one Lightning error per job); a cluster launcher started where SLURM is absent says
    so, instead of submitit's traceback."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": str(Path(sys.executable).parent)}

    def sweep(*extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "spineseg.cli.train", "-m", *TINY, "name=faults",
               f"paths.output_dir={tmp_path / 'out'}", "model=unet_lite0,fpn_lite0", *extra]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
        assert res.returncode == 1
        return res.stderr.strip().splitlines()

    (line,) = sweep("trainer=gpu")
    assert line.startswith(
        "error: job 'model=unet_lite0': trainer.accelerator=gpu needs a CUDA GPU, and "
    ) and line.endswith(
        "use trainer=cpu, or run on a GPU machine (hydra/launcher=slurm submits there) "
        "(nothing was run)"
    )
    assert sweep("trainer=gpu", "hydra/launcher=slurm") == [
        "error: hydra/launcher=slurm submits to a SLURM cluster, and this machine has no srun: "
        "start the sweep on the cluster's login node, or run it here with hydra/launcher=basic "
        "(or local_parallel) (nothing was run)"
    ]  # the device is not checked: the cluster's nodes have the GPUs
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.ckpt"))


def test_asking_for_cuda_without_it_tells_a_cpu_build_from_a_hidden_gpu(monkeypatch) -> None:
    import torch

    from spineseg.checks import check_device
    from spineseg.errors import ConfigError
    from spineseg.predict import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"^device=cuda:1 needs a CUDA GPU, and this torch "
                       r"\(.+\) is a CPU-only build: use device=cpu$"):  # fmt: skip
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"^trainer.accelerator=cuda needs a CUDA GPU, and torch "
                       r"\(CUDA 12.4\) sees no GPU \(CUDA_VISIBLE_DEVICES=\): use trainer=cpu"):  # fmt: skip
        check_device(OmegaConf.create({"trainer": {"accelerator": "cuda"}}))
    for fine in ("cpu", "auto"):
        check_device(OmegaConf.create({"trainer": {"accelerator": fine}}))


def test_only_a_cluster_launcher_runs_its_jobs_elsewhere(compose_train) -> None:
    from spineseg.sweep import jobs_run_here

    assert jobs_run_here(compose_train(hydra_cfg=True))
    for here in ("local_parallel", "submitit_local"):
        assert jobs_run_here(compose_train(f"hydra/launcher={here}", hydra_cfg=True))
    assert not jobs_run_here(compose_train("hydra/launcher=slurm", hydra_cfg=True))


def test_a_sweep_with_one_bad_job_is_refused_before_the_first_runs(tmp_path: Path) -> None:
    res = _train(tmp_path, "model=unet_lite0,fpn_lite0", "data.batch_size=2,0", multirun=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "job 'model=unet_lite0 data.batch_size=0" in res.stderr
    assert "data.batch_size must be a whole number >= 1, got 0 (nothing was run)" in res.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.ckpt"))
