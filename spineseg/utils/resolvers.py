"""OmegaConf resolvers used by conf/ (registered on `import spineseg`)."""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

_UNSAFE = re.compile(r"[^A-Za-z0-9._=@,-]+")


def amp_precision() -> str:
    """bf16-mixed on GPUs that support it (Ampere+), else 16-mixed; 32-true without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def on_gpu(accelerator: str) -> bool:
    """Whether `accelerator` runs on CUDA: GPU-only settings (SyncBatchNorm) follow it, so
    `trainer=ddp trainer.accelerator=cpu` (gloo) runs as it is."""
    import torch

    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def member_name(model: str, swept: Any, _root_: DictConfig) -> str:
    """The model's name in the store and its job folder: the preset's name, plus each swept
    option's value when a multirun sweeps more than the model (`unet_lite0+data.preprocess=
    clahe`), so that no two jobs of a sweep ever share a folder or a store entry.

    `swept` lists those options (spineseg.sweep.SweepGuard sets it); a config group's value
    is its choice (`data=folder` -> `folder`)."""
    parts = [model]
    for key in swept or ():
        value = OmegaConf.select(_root_, key, default=None)
        if isinstance(value, DictConfig) or value is None:
            value = _group_choice(_root_, key)
        parts.append(f"{key}={_UNSAFE.sub('_', str(value))}")
    return "+".join(parts)


def _group_choice(root: DictConfig, key: str) -> str | None:
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None)
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return choices.get(key)


#: The one switch for every progress bar (training and predict): false for logs and CI.
PROGRESS_ENV = "SPINESEG_PROGRESS"


def progress() -> Any:
    """`${progress:}`: True unless SPINESEG_PROGRESS says false; a value that is neither is
    passed on as it is, for the option's own check to name."""
    value = os.environ.get(PROGRESS_ENV, "true")
    return {"true": True, "false": False}.get(value.strip().lower(), value)


RESOLVERS = {
    "amp_precision": amp_precision,
    "on_gpu": on_gpu,
    "member": member_name,
    "progress": progress,
}


def register() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
