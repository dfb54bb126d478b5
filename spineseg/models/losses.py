"""Dice + BCE (region) and Dice + CE (vertebrae), from smp's losses."""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn


class SegmentationLoss(nn.Module):
    """Weighted sum of a Dice loss and a pixel-wise cross-entropy.

    Dice handles the small foreground (Th8-Th11 cover a few % of a film); the
    cross-entropy term keeps gradients well-behaved early in training.
    """

    def __init__(self, target: str, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.target = target
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        if target == "region":
            self.dice = DiceLoss("binary", from_logits=True)
            self.ce: nn.Module = nn.BCEWithLogitsLoss()
        else:
            self.dice = DiceLoss("multiclass", from_logits=True)
            self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.target == "region":
            dice = self.dice(logits, mask.unsqueeze(1))
            ce = self.ce(logits, mask.unsqueeze(1).to(logits.dtype))
        else:
            dice = self.dice(logits, mask)
            ce = self.ce(logits, mask)
        return self.dice_weight * dice + self.ce_weight * ce
