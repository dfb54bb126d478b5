"""How a `target=levels` network encodes every vertebra, and the Th8..Th11 region it yields.

Both encodings split the problem in two: channel 0 says *vertebra or not* (a binary map,
as easy to learn as the region), and the rest say *which vertebra*, learned only on vertebra
pixels, so the 17-way level question never competes with the background (a plain 18-class
softmax spent its first epochs predicting background everywhere on AASCE).

- `classes`: channels 1..L are one class per level (softmax, cross-entropy on vertebra
  pixels). P(region) = P(vertebra) x (P(Th8) + ... + P(Th11) | vertebra).
- `ordinal`: channel 1 regresses the level as a number (Th1 = 8, ..., L5 = 24), smooth L1
  on vertebra pixels, so a wrong answer is penalised by how many levels it is off.
  P(region) = P(vertebra) x a soft indicator that the level is within Th8..Th11 (edges half
  a level outside them, logistic with a tenth of a level's width).
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn
from torch.nn import functional as F

from spineseg.errors import ConfigError, choices_message
from spineseg.names import LEVELS, TARGET_VALUES

ENCODINGS = ("classes", "ordinal")
#: Width of the ordinal band's logistic edge, in levels.
ORDINAL_EDGE = 0.1
_CENTRE, _SCALE = (len(LEVELS) + 1) / 2, len(LEVELS) / 2  # level value <-> network output


def check_encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ConfigError(choices_message("levels encoding", encoding, list(ENCODINGS)))
    return encoding


def channels(encoding: str) -> int:
    return 1 + len(LEVELS) if check_encoding(encoding) == "classes" else 2


def level_of(output: torch.Tensor) -> torch.Tensor:
    """The ordinal channel as a level value (Th8 = 15)."""
    return output * _SCALE + _CENTRE


def region_probabilities(logits: torch.Tensor, encoding: str) -> torch.Tensor:
    """(B, C, H, W) network output -> (B, 1, H, W) P(Th8..Th11)."""
    vertebra = torch.sigmoid(logits[:, :1])
    if encoding == "classes":
        levels = torch.softmax(logits[:, 1:], dim=1)
        index = torch.as_tensor((TARGET_VALUES - 1).astype("int64"), device=logits.device)
        inside = levels.index_select(1, index).sum(1, keepdim=True)
    else:
        level = level_of(logits[:, 1:2])
        lo, hi = float(TARGET_VALUES[0]) - 0.5, float(TARGET_VALUES[-1]) + 0.5
        inside = torch.sigmoid((level - lo) / ORDINAL_EDGE) - torch.sigmoid(
            (level - hi) / ORDINAL_EDGE
        )
    return (vertebra * inside).clamp_(0.0, 1.0)


class LevelsLoss(nn.Module):
    """Dice + BCE on *vertebra or not*, plus the level term on vertebra pixels only."""

    def __init__(self, encoding: str, dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.encoding = check_encoding(encoding)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.dice = DiceLoss("binary", from_logits=True)

    def forward(self, logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        fg = (levels > 0).unsqueeze(1)
        vertebra = logits[:, :1]
        loss = self.dice_weight * self.dice(vertebra, fg.long()) + self.ce_weight * (
            F.binary_cross_entropy_with_logits(vertebra, fg.to(vertebra.dtype))
        )
        on = levels > 0
        if not bool(on.any()):
            return loss + 0.0 * logits[:, 1:].sum()
        if self.encoding == "classes":
            target = torch.where(on, levels - 1, torch.full_like(levels, -100))
            term = F.cross_entropy(logits[:, 1:], target, ignore_index=-100)
        else:
            level = level_of(logits[:, 1])[on]
            term = F.smooth_l1_loss(level, levels[on].to(level.dtype))
        return loss + term
