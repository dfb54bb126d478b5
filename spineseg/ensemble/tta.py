"""Test-time augmentation: a member's probabilities averaged over transformed copies of the
film, each mapped back. Only the left-right mirror is offered: an AP film mirrored is a
plausible PA film, while rotations, vertical flips or rescaling would show anatomy the
models never meet (a spine upside down, a film at another magnification).

Training stores every variant's probabilities (`<split>.npz`, `<split>+flip.npz`), so the
ensemble can score every rule with and without it; validation picks the one used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from spineseg.errors import ConfigError, choices_message

VARIANTS: tuple[str, ...] = ("none", "flip")
#: Variants each training stores beside the plain probabilities.
STORED: tuple[str, ...] = ("flip",)


def check(variant: str) -> str:
    if variant not in VARIANTS:
        raise ConfigError(choices_message("test-time augmentation", variant, list(VARIANTS)))
    return variant


def suffix(variant: str) -> str:
    """The store's file suffix of a variant: '' for none, '+flip' for flip."""
    return "" if check(variant) == "none" else f"+{variant}"


def apply(probabilities: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
          variant: str) -> torch.Tensor:  # fmt: skip
    """`probabilities(x)` under `variant`: (N,C,H,W), the flipped copy flipped back and
    averaged with the plain one."""
    p = probabilities(x)
    if check(variant) == "flip":
        p = (p + probabilities(x.flip(-1)).flip(-1)) / 2
    return p
