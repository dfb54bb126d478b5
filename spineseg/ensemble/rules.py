"""The voting rules by name: one `Rule` entry each, and nothing else needs to know them.

A rule is its fuse function (`voting`), how its fused score is decided, whether it needs
weights, whether it traces into an ONNX graph, and optionally its *band kernel*: how it labels
the pixels where the models disagree, which lets `scoring` skip the pixels where they all
agree (`agreement`). A rule without a kernel is scored by fusing every pixel, with the same
labels, only slower. Adding a rule is one entry in `RULES` plus its tests:
`tests/test_rules.py` runs every entry through both paths and compares the labels.

A band kernel may use a rule's fuse function on the band's values only if the fused score
lies between the models' minimum and maximum at every pixel (a mean, a median, a vote
fraction...): that is what makes the agreement pixels' labels the unanimous vote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from spineseg.ensemble import voting
from spineseg.errors import ConfigError, choices_message

if TYPE_CHECKING:
    from spineseg.ensemble.agreement import Band

__all__ = ["RULES", "BandLabels", "Rule", "fuse", "fuse_labels", "get"]


class BandLabels(NamedTuple):
    """A kernel's labels of the band's pixels (M,) bool; a rule whose decision depends on
    the whole image (STAPLE) also says how it labels each image's unanimous pixels."""

    labels: Tensor
    on_bg: Tensor | None = None  # (n,) bool: the label of pixels where every model says 0
    on_fg: Tensor | None = None  # (n,) bool: ... where every model says 1


#: (band, the method's threshold, weights or None) -> the band's labels
Kernel = Callable[["Band", float, Tensor | None], BandLabels]


@dataclass(frozen=True)
class Rule:
    """One voting rule. `decides_at_half`: the fused score is a vote fraction or a posterior,
    so the threshold binarises each model and the fused decision is the majority / MAP at 0.5
    (applying a tuned t = 0.3 again would mean "30% of the models")."""

    name: str
    fuse: Callable[..., Tensor]
    decides_at_half: bool = False
    needs_weights: bool = False
    traceable: bool = True  # a fixed graph: the ONNX export can hold it
    band: Kernel | None = None
    #: (K, pixels per image) -> whether `band` reproduces the dense rule for such a chunk
    band_applies: Callable[[int, int], bool] | None = None

    def decision_threshold(self, threshold: float) -> float:
        return 0.5 if self.decides_at_half else threshold

    def scores_band(self, k: int, npix: int) -> bool:
        return self.band is not None and (self.band_applies is None or self.band_applies(k, npix))


# ---------------------------------------------------------------------- band kernels
def _fused_on_band(rule_fuse: Callable[..., Tensor]) -> Kernel:
    """The rule's own fuse function on the band's values, decided at the threshold."""

    def kernel(band: Band, threshold: float, weights: Tensor | None) -> BandLabels:
        probs = band.values.reshape(band.k, 1, 1, 1, -1)
        scores = rule_fuse(probs, weights=weights, threshold=threshold)
        return BandLabels(voting.to_labels(scores, threshold).reshape(-1).bool())

    return kernel


def _hard_band(band: Band, threshold: float, weights: Tensor | None) -> BandLabels:
    return BandLabels(band.count > band.k // 2)  # a strict majority: 2c > K


def _max_band(band: Band, threshold: float, weights: Tensor | None) -> BandLabels:
    return BandLabels(torch.ones_like(band.count, dtype=torch.bool))  # some model is above t


def _median_band(band: Band, threshold: float, weights: Tensor | None) -> BandLabels:
    """median > t from the vote counts; an even K's exact tie needs the two middle values.

    Odd K: the middle value exceeds t iff a majority does. Even K: with more than K/2 votes
    both middle values exceed t, with fewer neither does; with exactly K/2 the lower middle
    is the largest value <= t and the upper the smallest value > t, averaged as the dense
    rule does."""
    k = band.k
    lab = band.count > k // 2
    if k % 2:
        return BandLabels(lab)
    tie = (band.count == k // 2).nonzero().squeeze(1)
    if tie.numel():
        v = band.values.index_select(1, tie)
        up = band.votes.index_select(1, tie)
        upper = torch.where(up, v, torch.inf).amin(0)
        lower = torch.where(up, -torch.inf, v).amax(0)
        lab[tie] = ((lower + upper) / 2).clamp_(0.0, 1.0) > threshold
    return BandLabels(lab)


def _staple_band(band: Band, threshold: float, weights: Tensor | None) -> BandLabels:
    """STAPLE per image from pattern counts: the band pixels' own codes plus the agreement
    pixels as pattern 0 (all background) and pattern 2^K - 1 (all foreground)."""
    k, n = band.k, len(band.split_n)
    n_pat = 2**k
    img = torch.repeat_interleave(torch.arange(n), band.split_n)
    flat = img * n_pat + voting.vote_codes(band.votes)
    counts = torch.bincount(flat, minlength=n * n_pat).reshape(n, n_pat)
    counts[:, 0] += band.npix - band.fg_n - band.split_n
    counts[:, n_pat - 1] += band.fg_n
    on = voting.staple_patterns(counts, k).posterior.clamp(0.0, 1.0) > 0.5
    return BandLabels(on.reshape(-1)[flat], on[:, 0], on[:, n_pat - 1])


def _staple_by_patterns(k: int, npix: int) -> bool:
    """The dense STAPLE runs pixel-wise EM for K > 16 or 2^K >= P: same numbers only there."""
    return k <= 16 and 2**k < npix


# ---------------------------------------------------------------------- the registry
RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("soft", voting.soft_vote, band=_fused_on_band(voting.soft_vote)),
        Rule("hard", voting.hard_vote, decides_at_half=True, band=_hard_band),
        Rule(
            "weighted",
            voting.weighted_vote,
            needs_weights=True,
            band=_fused_on_band(voting.weighted_vote),
        ),
        Rule("max", voting.max_vote, band=_max_band),
        Rule("median", voting.median_vote, band=_median_band),
        Rule(
            "staple",
            voting.staple,
            decides_at_half=True,
            traceable=False,  # EM iterates until it converges
            band=_staple_band,
            band_applies=_staple_by_patterns,
        ),
        Rule("logit_mean", voting.logit_mean, band=_fused_on_band(voting.logit_mean)),
    )
}


def get(name: str) -> Rule:
    """The rule called `name`; an unknown name is a config error listing the valid ones."""
    rule = RULES.get(name)
    if rule is None:
        raise ConfigError(choices_message("voting rule", name, list(RULES)))
    return rule


def fuse(
    name: str, probs: Tensor, weights: voting.WeightsLike = None, threshold: float = 0.5
) -> Tensor:
    """Scores (N, C, H, W) of the rule called `name` on (K, N, C, H, W) probabilities."""
    rule = get(name)
    if rule.needs_weights and weights is None:
        raise ConfigError(f"voting rule {name!r} needs weights (one per model)")
    return rule.fuse(probs, weights=weights, threshold=threshold)


def fuse_labels(
    name: str, probs: Tensor, weights: voting.WeightsLike = None, threshold: float = 0.5
) -> Tensor:
    """`fuse` then `voting.to_labels`, with the decision threshold the rule means."""
    scores = fuse(name, probs, weights=weights, threshold=threshold)
    return voting.to_labels(scores, get(name).decision_threshold(threshold))
