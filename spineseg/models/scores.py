"""The evaluator's overlap scores as torchmetrics shells, for training's validation and test.

Training monitors `val/dice` to keep its best checkpoint; with this shell around the pure
`spineseg.ensemble.metrics.overlap_scores` (the core of `overlap_metrics`) it is the very
Dice (per image, then averaged; both-empty = 1) that selection ranks models by and the
report prints.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from spineseg.ensemble.metrics import overlap_scores


class OverlapScore(Metric):
    """Mean over images of one per-image overlap score (`dice`, `iou`, ...)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, key: str, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.key, self.num_classes = key, num_classes
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, truth: torch.Tensor) -> None:
        """pred, truth: (N, H, W) labels, as `overlap_metrics` takes them; scored where they
        are (on a GPU, no copy to the host and no wait each validation batch)."""
        scores = overlap_scores(pred.detach(), truth.detach(), self.num_classes)[self.key]
        self.total += scores.sum().to(self.total.dtype)
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        if int(self.count) == 0:
            return torch.tensor(math.nan)
        return (self.total / self.count).to(torch.float32)
