"""Train one model: fit, test the best checkpoint, write its probabilities to the store.

Idempotent and resumable: a model whose predictions are complete (for the same config) is
skipped; an interrupted one resumes from `last.ckpt`; a failure is recorded in the
model's manifest and, inside a sweep, does not stop the other models.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from spineseg.checks import check_device, check_run
from spineseg.config import construct, instantiate_node
from spineseg.data.datamodule import SpineDataModule
from spineseg.ensemble import tta as TTA
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import RefusedError
from spineseg.identity import (
    config_hash,
    input_digests,
    listed,
    recorded_changes,
    recorded_config,
    same_model,
)
from spineseg.models.module import SegmentationModule
from spineseg.names import EXTERNAL, STORED_TARGET, TEST, VAL
from spineseg.utils.io import file_digest, hold_lock

log = logging.getLogger(__name__)


class _NoProductTips(logging.Filter):
    """Drop Lightning's "💡 Tip: try installing litlogger / litmodels" lines: advertising,
    not information about the run, repeated in every job's log of a 20-model sweep."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoProductTips())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _readable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception as err:
        log.warning("%s is unreadable (%s: %s)", path, type(err).__name__, err)
        return False


def resume_point(folder: Path) -> Path | None:
    """The checkpoint to resume from: `last.ckpt`, else `best.ckpt` (both carry the whole
    training state). One torn by a kill or a full disk mid-write is moved aside, kept for
    inspection, and the previous good one is used: a torn file never restarts a long
    training from zero, and never crashes it."""
    for name in ("last.ckpt", "best.ckpt"):
        path = folder / name
        if not path.is_file():
            continue
        if _readable(path):
            return path
        aside = path.with_name(f"{name}.torn-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        log.warning("moved %s aside to %s; resuming from the previous good checkpoint", path, aside)
    return None


def build_module(cfg: DictConfig, pretrained: bool = True) -> SegmentationModule:
    # resuming: the checkpoint has every weight, so nothing is fetched
    return construct(cfg.module, **({} if pretrained else {"weights": None}))


def build_trainer(cfg: DictConfig) -> L.Trainer:
    def built(group: str) -> list[Any]:
        nodes = (cfg.get(group) or {}).items()
        return [instantiate_node(c, f"{group}.{k}") for k, c in nodes if c is not None]

    return instantiate_node(
        cfg.trainer, "trainer", callbacks=built("callbacks"), logger=built("logger") or False
    )


def write_truth(store: PredictionStore, dm: SpineDataModule) -> None:
    """The truth of what is stored (the derived region for levels models), plus Th8..Th11
    for the level-error metric."""
    for split in dm.split_names:
        part = dm.parts[split]
        store.write_truth(
            split,
            part.masks(STORED_TARGET[dm.target]),
            part.ids,
            images=part.images,
            spacing=part.spacing,
            vertebrae=part.vertebrae(),
        )


def build_eval_trainer(cfg: DictConfig, fitted: L.Trainer) -> L.Trainer:
    """One device of the fit's kind, its precision and loggers, no callbacks: validation,
    test and prediction see every film exactly once."""
    return L.Trainer(
        accelerator=fitted.accelerator,
        devices=1,
        num_nodes=1,
        precision=cfg.trainer.get("precision", "32-true"),
        logger=fitted.loggers or False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)),
        enable_model_summary=False,
        default_root_dir=cfg.job_dir,
    )


def _leave_process_group() -> None:
    """After a data-parallel fit: leave the group, so that rank 0's single-process
    evaluation never waits for ranks that have finished (torchmetrics syncs otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _checkpoint_callback(trainer: L.Trainer) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)


def _holds_training(manifest: dict | None, job_dir: Path) -> bool:
    """Whether a model's folder holds work another config would lose: a finished model, or a
    checkpoint to resume from. An attempt that failed before its first checkpoint (a value
    the optimiser or the trainer refused) holds nothing, so a corrected rerun may start."""
    if (manifest or {}).get("status") == "complete":
        return True
    return any((job_dir / "checkpoints").glob("*.ckpt*"))


#: Job folders this process holds (kept open: the lock lasts as long as the process).
_LOCKS: dict[str, Any] = {}


def train(cfg: DictConfig) -> dict[str, Any]:
    run_dir, job_dir = Path(cfg.run_dir), Path(cfg.job_dir)
    name = cfg.member
    if rank_zero_only.rank == 0 and str(job_dir) not in _LOCKS:  # one writer per job folder
        _LOCKS[str(job_dir)] = hold_lock(job_dir, f"a training of {name!r}")
    check_run(cfg)  # a typo stops here, before any film is decoded
    check_device(cfg)
    store = PredictionStore(run_dir)
    digest = config_hash(cfg)
    manifest = store.read_manifest(name)
    recorded = (manifest or {}).get("config_hash")  # None: it failed before it started
    same = same_model(manifest, cfg, digest)
    if recorded is not None and not same and not cfg.get("overwrite"):
        if _holds_training(manifest, job_dir):
            raise RefusedError(
                f"{run_dir} already holds model {name!r} trained with another config"
                f"{listed(recorded_changes(manifest, cfg) or [])}; "
                "choose a new run name (run=...) or pass overwrite=true to retrain it"
            )
        log.info(
            "%s: the earlier attempt with another config stopped before anything was trained "
            "(%s); training it with this one",
            name,
            (manifest or {}).get("error") or (manifest or {}).get("status"),
        )

    dm: SpineDataModule = construct(cfg.data, run_dir=str(run_dir))
    dm.setup("fit")
    if same and store.is_complete(name, dm.split_names):
        log.info(
            "%s: predictions complete, skipping (delete %s to retrain)", name, store.root / name
        )
        return manifest

    L.seed_everything(cfg.seed, workers=True)
    last = job_dir / "checkpoints" / "last.ckpt"
    start_from = None if cfg.get("overwrite") else resume_point(last.parent)
    resume = start_from is not None
    started = time.time()
    trainer = build_trainer(cfg)
    base = {
        "model": name,
        "preset": {k: cfg.model.get(k) for k in ("arch", "encoder", "weights")},
        "target": dm.target,
        "config": recorded_config(cfg),
        "config_hash": digest,
        "inputs": input_digests(cfg),
        "splits": dm.split_names,
        "started_at": _now(),
        "error": None,
        "resumed_from": str(start_from) if resume else None,
        "fit_processes": trainer.world_size,
    }
    if trainer.is_global_zero:  # one writer of the store, whatever the number of processes
        write_truth(store, dm)
        store.write_manifest(name, {**base, "status": "running"})

    module = build_module(cfg, pretrained=not resume)
    trainer.fit(module, datamodule=dm, ckpt_path=str(start_from) if resume else None)
    if trainer.world_size > 1:
        # Evaluation and prediction run in one process on one device: a distributed sampler
        # would pad the shards with duplicates, and every rank would write the store.
        zero = trainer.is_global_zero
        _leave_process_group()
        if not zero:
            return {"model": name, "status": "worker", "rank": trainer.global_rank}
    ckpt_cb = _checkpoint_callback(trainer)
    best = ckpt_cb.best_model_path if ckpt_cb and ckpt_cb.best_model_path else None
    epochs = trainer.current_epoch
    if trainer.world_size > 1:
        trainer = build_eval_trainer(cfg, trainer)
    if best:
        module = SegmentationModule.from_checkpoint(best)
    module.eval()
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    tests = trainer.test(module, datamodule=dm, verbose=False)
    digests = {}
    for variant in ("none", *TTA.STORED):  # plain, then each test-time augmentation
        module.tta = variant
        outputs = trainer.predict(module, dataloaders=dm.predict_dataloader())
        if len(dm.split_names) == 1:
            outputs = [outputs]
        for split, batches in zip(dm.split_names, outputs, strict=True):
            probs = torch.cat([b["probs"] for b in batches]).numpy()
            ids = [i for b in batches for i in b["ids"]]
            path = store.write_probs(name, split, probs, ids, tta=variant)
            digests[f"{split}{TTA.suffix(variant)}"] = file_digest(path)
    module.tta = "none"

    metrics = {k.split("/", 1)[1]: float(v) for k, v in val.items() if k.startswith("val/")}
    test_metrics = {k: float(v) for d in tests for k, v in d.items()}
    done = {
        **base,
        "status": "complete",
        "digests": digests,  # verified before the ensemble scores them
        "checkpoint": best or (str(last) if last.exists() else None),
        "val_metrics": metrics,
        "test_metrics": test_metrics,
        "epochs": epochs,
        "finished_at": _now(),
        "elapsed_s": round(time.time() - started, 2),
    }
    store.write_manifest(name, done)
    _print_table(name, metrics, test_metrics)
    return done


def record_failure(cfg: DictConfig, err: BaseException, status: str = "failed") -> None:
    """Mark the model `failed` (or `interrupted`) in its manifest, with the error, so the
    sweep can report it and the next run resumes it. A finished model is never touched."""
    try:
        if rank_zero_only.rank != 0 or isinstance(err, RefusedError):
            return  # rank zero records for the job; a refusal changed nothing to record
        store = PredictionStore(Path(cfg.run_dir))
        name = cfg.member
        old = store.read_manifest(name) or {}
        if old.get("status") == "complete":  # a finished model is never marked failed
            log.error("%s: not recorded, the stored model is complete (%s)", name, err)
            return
        store.write_manifest(
            name,
            {
                **old,
                "model": name,
                "preset": {k: cfg.model.get(k) for k in ("arch", "encoder", "weights")},
                "status": status,
                "error": f"{type(err).__name__}: {err}",
                "traceback": "".join(traceback.format_exception(err, limit=20)),
                "finished_at": _now(),
            },
        )
    except Exception:  # recording must never mask the original error
        log.exception("could not record the failure of %s", cfg.model.get("name"))


def _print_table(name: str, val: dict, test: dict) -> None:
    rows = [(VAL, val.get("dice"), val.get("iou"))]
    for split in (TEST, EXTERNAL):
        if f"{split}/dice" in test:
            rows.append((split, test[f"{split}/dice"], test.get(f"{split}/iou")))
    lines = [f"\n{name}", f"{'split':<10}{'dice':>8}{'iou':>8}"]
    for split, dice, iou in rows:
        fmt = lambda v: f"{v:8.4f}" if isinstance(v, float) and np.isfinite(v) else f"{'-':>8}"  # noqa: E731
        lines.append(f"{split:<10}{fmt(dice)}{fmt(iou)}")
    print("\n".join(lines), flush=True)
