"""OmegaConf resolvers used by conf/ (registered on `import spineseg`)."""

from __future__ import annotations

from omegaconf import OmegaConf


def amp_precision() -> str:
    """bf16-mixed on GPUs that support it (Ampere+), else 16-mixed; 32-true without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def register() -> None:
    if not OmegaConf.has_resolver("amp_precision"):
        OmegaConf.register_new_resolver("amp_precision", amp_precision)
