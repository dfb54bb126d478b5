"""Checks of a run's config that need no data: every number with its valid range, every
name with its choices, so a typo stops in one line before any film is decoded or any
weight is loaded (and before a sweep of 20 models starts, not after it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from spineseg.errors import ConfigError

#: Whole-number options and their smallest valid value (None: the option may be absent).
MINIMUMS: dict[str, int] = {
    "seed": 0,
    "data.batch_size": 1,
    "data.split_seed": 0,
    "trainer.max_epochs": 1,
    "ensemble.top_k": 1,
    "ensemble.greedy_size": 1,
    "ensemble.chunk_size": 1,
    "ensemble.n_boot": 1,
    "ensemble.gallery_n": 0,
}


def check_whole(name: str, value: Any, low: int) -> int:
    """`value` as an int >= `low`, or one line naming the option and its range."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value, ok = int(value), True
    if not ok or value < low:
        raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


def check_numbers(cfg: DictConfig | dict, prefix: str = "") -> None:
    """Every option of MINIMUMS under `prefix` ('' for a whole run's config, 'ensemble.'
    for the ensemble's own) that `cfg` sets."""
    for path, low in MINIMUMS.items():
        if not path.startswith(prefix):
            continue
        value = OmegaConf.select(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg,
                                 path.removeprefix(prefix), default=None)  # fmt: skip
        if value is not None:
            check_whole(path, value, low)


def check_run(cfg: DictConfig) -> None:
    """What `spineseg-train` checks before it touches data: numbers, the model's
    architecture and encoder, the data loader's workers, a cascade's stage 1, and the
    ensemble options the sweep will end with."""
    from spineseg.data.cascade import check_stage1_run
    from spineseg.data.datamodule import resolve_workers
    from spineseg.ensemble.evaluate import ensemble_config
    from spineseg.models.factory import check_arch, check_encoder

    check_numbers(cfg)
    check_arch(str(cfg.model.arch))
    check_encoder(str(cfg.model.encoder))
    resolve_workers(cfg.data.get("num_workers", "auto"))
    check_stage1_run(cfg.data.get("crop"))
    check_roots(cfg.data)
    if cfg.get("ensemble") is not None:
        ensemble_config(cfg.ensemble)


#: `trainer.accelerator` values that need a CUDA GPU (Lightning's names for it).
CUDA_ACCELERATORS = ("gpu", "cuda")


def require_cuda(option: str, instead: str) -> None:
    """`option` asks for a CUDA GPU: without one, one line that tells a CPU-only torch build
    (reinstall) from a machine or job that sees no GPU, and what to use `instead`."""
    import torch

    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        why = f"torch (CUDA {torch.version.cuda}) sees no GPU (CUDA_VISIBLE_DEVICES={visible})"
    raise ConfigError(f"{option} needs a CUDA GPU, and {why}: {instead}")


def check_device(cfg: DictConfig) -> None:
    """`trainer=gpu` or `ddp` where torch sees no GPU stops before any film is decoded. It
    runs where the job trains; SweepGuard runs it before a sweep only when the launcher runs
    the jobs on this machine, never on a cluster's login node."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    if accelerator in CUDA_ACCELERATORS:
        require_cuda(
            f"trainer.accelerator={accelerator}",
            "use trainer=cpu, or run on a GPU machine (hydra/launcher=slurm submits there)",
        )


def check_roots(data: DictConfig) -> None:
    """A dataset folder (or a label-corrections file) that does not exist stops the run (every
    job of a sweep) in one line naming the option, before anything trains; a relative path is
    read from where the command runs, which the line says, since that is the usual cause."""
    for key, spec in (("data", data), ("data.external", data.get("external"))):
        root = spec.get("root") if spec else None
        if root is not None and not Path(str(root)).expanduser().exists():
            raise ConfigError(
                f"{key}.root={root} does not exist{_read_from(root)}; set {key}.root to the "
                f"folder of your {spec.get('source')} data"
            )
        fixes = spec.get("level_corrections") if spec else None
        if fixes and not Path(str(fixes)).expanduser().is_file():
            raise ConfigError(
                f"{key}.level_corrections={fixes} is not a file{_read_from(fixes)}; write it "
                "with spineseg-validate-data review=<dir> or level_offsets=<csv>"
            )


def _read_from(path: object) -> str:
    relative = not Path(str(path)).expanduser().is_absolute()
    return f" (a relative path is read from {Path.cwd()})" if relative else ""
