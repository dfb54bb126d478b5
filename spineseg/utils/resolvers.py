"""OmegaConf resolvers used by conf/ (registered on `import spineseg`)."""

from __future__ import annotations

from omegaconf import OmegaConf


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


RESOLVERS = {"amp_precision": amp_precision, "on_gpu": on_gpu}


def register() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
