"""A film-blind reference: the region where it lies on the training films, placed unchanged on
every film.

Films of one dataset are framed alike (AASCE from just above T1 to the sacrum), so the
height of Th8..Th11 on the film is nearly constant, and a model can score a plausible Dice
and level-error rate by learning that height instead of the anatomy. The atlas is the mean
of the training films' masks in film-relative coordinates (every film stretched to one
grid), cut at the threshold that scores best on those same training films; nothing about a
held-out film but its size goes in. A model's level-error rate means something only beside
the atlas's on the same films (`spineseg-score` scores both; docs/real-films.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from spineseg.ensemble.metrics import overlap_metrics

#: The grid (H, W) every training film's mask is stretched to: film-relative coordinates.
ATLAS_GRID = (256, 128)
#: Where the mean mask may be cut; the one scoring best on the training films is kept.
ATLAS_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.05), 2))


@dataclass(frozen=True)
class Atlas:
    """probs: (C, H, W) the share of training films on which each class (1..C) covers a
    pixel; threshold: where their sum is cut; n: how many films it averages."""

    probs: np.ndarray
    threshold: float
    n: int

    def labels(self, shape: tuple[int, int]) -> np.ndarray:
        """The atlas on a film of `shape`: 0 background, else the most frequent class."""
        h, w = int(shape[0]), int(shape[1])
        up = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in self.probs])
        out = (up.argmax(0) + 1).astype(np.uint8)
        out[up.sum(0) < self.threshold] = 0
        return out


def on_grid(mask: np.ndarray, grid: tuple[int, int] = ATLAS_GRID) -> np.ndarray:
    """A label map stretched to the grid (nearest: labels stay labels)."""
    return cv2.resize(mask.astype(np.uint8), (grid[1], grid[0]), interpolation=cv2.INTER_NEAREST)


def fit_atlas(masks: Sequence[np.ndarray] | np.ndarray, num_classes: int) -> Atlas:
    """The atlas of (N, H, W) label maps on one grid (`on_grid`, or one working size), with
    classes 0..num_classes-1; the cut is chosen by mean foreground Dice on those maps."""
    stack = np.asarray(masks, dtype=np.uint8)
    if stack.ndim != 3 or not len(stack):
        raise ValueError(f"fit_atlas needs (N, H, W) label maps, got shape {stack.shape}")
    probs = np.stack([(stack == c).mean(0, dtype=np.float64) for c in range(1, num_classes)])
    probs = probs.astype(np.float32)
    fg, truth = probs.sum(0), (stack > 0).astype(np.uint8)

    def score(t: float) -> float:
        pred = np.broadcast_to((fg >= t).astype(np.uint8), truth.shape)
        return float(np.nanmean(overlap_metrics(pred, truth, 2)["dice"]))

    best = max(ATLAS_THRESHOLDS, key=score)
    return Atlas(probs, best, len(stack))
