"""Voting rules: fuse K models' stored probabilities into one score map per image.

Pure functions of tensors so they can be tested without Lightning and reused by the stateful
layers (selection, evaluation, callbacks); `rules.RULES` names them and says how each decides.

Shapes: `probs` is (K, N, C, H, W) float in [0, 1] (K models, N images). `C == 1` is binary
"region" mode (the channel is P(foreground)); `C > 1` is "vertebrae" mode (softmax over classes,
0 = background). Every rule returns float32 scores (N, C, H, W) in [0, 1]; `to_labels` turns
scores into uint8 labels (N, H, W).

Conventions
- Every rule treats each image independently, so fusing any chunk of images equals the
  corresponding slice of fusing all of them (the evaluator streams chunks).
- Binary decision: foreground iff score > threshold (strict).
- Hard vote, binary: the score is the fraction of models with p > threshold, so
  `to_labels(score, 0.5)` is a strict majority; with an even K a tie (exactly half) is
  background. Multiclass: the score of class c is the fraction of models whose argmax is c;
  a tie between classes goes to the lowest class index (`torch.argmax` returns the first
  maximum), both inside each model's argmax and in `to_labels`.
- Rules other than `weighted` accept and ignore `weights`; rules other than `hard`, `staple`
  and `disagreement` ignore `threshold` (it is applied later by `to_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from spineseg.errors import ConfigError

__all__ = [
    "StapleResult",
    "disagreement",
    "hard_vote",
    "logit_mean",
    "max_vote",
    "median_vote",
    "soft_vote",
    "staple",
    "staple_em",
    "staple_patterns",
    "to_labels",
    "vote_codes",
    "weighted_vote",
]

WeightsLike = Tensor | Sequence[float] | np.ndarray | None

_LOGIT_CLIP = 1e-6
_LOGIT_MAX = float(np.log((1 - _LOGIT_CLIP) / _LOGIT_CLIP))


def _as_probs(probs: Tensor | np.ndarray) -> Tensor:
    """(K, N, C, H, W) float32 view/copy; float32 keeps memory and results predictable."""
    probs = torch.as_tensor(probs)
    if probs.ndim != 5:
        raise ValueError(f"probs must have shape (K, N, C, H, W), got {tuple(probs.shape)}")
    if probs.shape[0] < 1:
        raise ValueError("probs must hold at least one model (K >= 1)")
    return probs if probs.dtype == torch.float32 else probs.float()


def _finish(scores: Tensor) -> Tensor:
    """Clamp float rounding (e.g. a weighted mean of ones at 1 + 1e-7) back into [0, 1]."""
    return scores.to(torch.float32).clamp_(0.0, 1.0)


def _argmax_uint8(x: Tensor, dim: int) -> Tensor:
    """argmax over a short class axis as uint8, ties -> lowest index (like `torch.argmax`).

    A running strict comparison over the few classes is ~3x faster on CPU than `argmax`
    over a non-last axis and avoids an int64 result."""
    if x.shape[dim] > 256:
        raise ValueError(f"at most 256 classes fit uint8 labels, got {x.shape[dim]}")
    best = x.select(dim, 0)
    idx = torch.zeros(best.shape, dtype=torch.uint8, device=x.device)
    for c in range(1, x.shape[dim]):
        cand = x.select(dim, c)
        idx.masked_fill_(cand > best, c)
        best = torch.maximum(best, cand)
    return idx


def _model_votes(probs: Tensor, threshold: float) -> Tensor:
    """Each model's hard decision (K, N, H, W): p > threshold (binary) or argmax (multiclass)."""
    if probs.shape[2] == 1:
        return (probs[:, :, 0] > threshold).to(torch.uint8)
    return _argmax_uint8(probs, 2)


def _vote_fractions(votes: Tensor, num_classes: int) -> Tensor:
    """Fraction of models voting for each class: (K, N, H, W) labels -> (N, num_classes, H, W)."""
    return torch.stack(
        [(votes == c).to(torch.float32).mean(dim=0) for c in range(num_classes)], dim=1
    )


def normalised_weights(weights: WeightsLike, k: int, device: torch.device) -> Tensor:
    """Validate and normalise to sum 1; bad weights are a config problem, so ConfigError."""
    if weights is None:
        raise ConfigError("voting rule 'weighted' needs weights (one per model)")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != k:
        raise ConfigError(f"weighted vote needs {k} weights (one per model), got {w.numel()}")
    if not bool(torch.isfinite(w).all()):
        raise ConfigError(f"weighted vote weights must be finite, got {w.tolist()}")
    if bool((w < 0).any()):
        raise ConfigError(f"weighted vote weights must be non-negative, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0:
        raise ConfigError(f"weighted vote weights must have a positive sum, got {w.tolist()}")
    return (w / total).to(device=device, dtype=torch.float32)


def soft_vote(probs: Tensor, *, weights: WeightsLike = None, threshold: float = 0.5) -> Tensor:
    """Mean probability over models (the paper's soft voting)."""
    return _finish(_as_probs(probs).mean(dim=0))


def hard_vote(probs: Tensor, *, weights: WeightsLike = None, threshold: float = 0.5) -> Tensor:
    """Fraction of models voting for each class (see the module docstring for ties)."""
    probs = _as_probs(probs)
    votes = _model_votes(probs, threshold)
    if probs.shape[2] == 1:
        return _finish(votes.to(torch.float32).mean(dim=0).unsqueeze(1))
    return _finish(_vote_fractions(votes, probs.shape[2]))


def weighted_vote(probs: Tensor, *, weights: WeightsLike = None, threshold: float = 0.5) -> Tensor:
    """Weighted mean probability; weights are normalised to sum 1 (e.g. validation Dice)."""
    probs = _as_probs(probs)
    return weighted_mean(probs, normalised_weights(weights, probs.shape[0], probs.device))


def weighted_mean(probs: Tensor, weights: Tensor) -> Tensor:
    """The weighted vote's computation, on weights already checked and normalised (no data-
    dependent branch: the ONNX export traces it)."""
    return _finish(_within_inputs(torch.tensordot(weights, probs, dims=1), probs))


def _within_inputs(fused: Tensor, probs: Tensor) -> Tensor:
    """Clamp a fused map to each pixel's [min, max] over models, where a weighted or
    geometric mean lies exactly. float32 weights summing to 1 + 1 ulp could otherwise put
    the mean of K equal values 1 ulp above them; with the clamp, "every model above t" and
    "every model at or below t" decide the fused label exactly, which the evaluator's
    agreement path relies on."""
    return torch.minimum(torch.maximum(fused, probs.amin(dim=0)), probs.amax(dim=0))


def max_vote(probs: Tensor, *, weights: WeightsLike = None, threshold: float = 0.5) -> Tensor:
    """Per-pixel maximum over models: the most permissive rule (union-like)."""
    return _finish(_as_probs(probs).amax(dim=0))


def median_vote(probs: Tensor, *, weights: WeightsLike = None, threshold: float = 0.5) -> Tensor:
    """True median over models: for even K the mean of the two middle values.

    `torch.median` would return the lower middle value, biasing even ensembles towards
    background."""
    probs = _as_probs(probs)
    k = probs.shape[0]
    if k % 2:
        return _finish(torch.kthvalue(probs, k // 2 + 1, dim=0).values)
    ordered = torch.sort(probs, dim=0).values  # one sort beats two kthvalue calls
    return _finish((ordered[k // 2 - 1] + ordered[k // 2]) / 2)


def logit_mean(probs: Tensor, *, weights: WeightsLike = None, threshold: float = 0.5) -> Tensor:
    """Geometric pooling: sigmoid of the mean logit (binary) or softmax of the mean
    log-probability (multiclass); probabilities are clipped at 1e-6 so a single confident
    model cannot force the fused score to exactly 0 or 1."""
    probs = _as_probs(probs)
    if probs.shape[2] == 1:
        # Clamping the logit at logit(1 - 1e-6) equals clipping p to [1e-6, 1 - 1e-6] (logit is
        # monotone) but stays symmetric in float32, where 1 - 1e-6 is not representable.
        # torch.special.logit is one fused kernel (log(p / (1 - p))), ~4x faster on CPU than
        # log(p) - log1p(-p); p = 0 and 1 give -inf and inf, which the clamp bounds.
        logits = torch.special.logit(probs).clamp_(-_LOGIT_MAX, _LOGIT_MAX)
        return _finish(_within_inputs(torch.sigmoid(logits.mean(dim=0)), probs))
    logp = torch.log(probs.clamp(_LOGIT_CLIP, 1.0)).mean(dim=0)
    return _finish(torch.softmax(logp, dim=1))


class StapleResult(NamedTuple):
    """STAPLE output for B independent binary problems with K raters."""

    posterior: Tensor  # (B, P) P(true label = 1) per pixel
    sensitivity: Tensor  # (B, K) estimated p_j
    specificity: Tensor  # (B, K) estimated q_j
    iterations: Tensor  # (B,) EM iterations each problem ran


def _staple_core(
    d: Tensor, counts: Tensor | None, *, eps: float, tol: float, max_iter: int
) -> StapleResult:
    """EM over columns of d (B, K, M) with optional column multiplicities counts (B, M).

    In float64: float32 batched matmuls round differently with the batch's size, which made
    an image's posterior depend (by ~1e-6) on which images shared its chunk. The outputs
    are float32."""
    b, k, _ = d.shape
    dev = d.device
    d = d.to(torch.float64)
    opts = {"device": dev, "dtype": torch.float64}
    if counts is None:
        d_sum = d.sum(2)  # (B, K): sum_i D_ij
        npix = torch.full((b, 1), float(d.shape[2]), **opts)
    else:
        counts = counts.to(torch.float64)
        d_sum = torch.bmm(d, counts[:, :, None])[:, :, 0]
        npix = counts.sum(1, keepdim=True)
    prior = (d_sum.sum(1) / (k * npix[:, 0])).clamp(eps, 1.0 - eps)  # (B,) mean vote
    log_odds_prior = torch.log(prior) - torch.log1p(-prior)
    p = torch.full((b, k), 0.99, **opts).clamp(eps, 1.0 - eps)
    q = p.clone()
    active = torch.ones(b, dtype=torch.bool, device=dev)
    iters = torch.zeros(b, dtype=torch.int64, device=dev)
    post = torch.zeros(b, d.shape[2], **opts)
    for _ in range(max_iter):
        # E-step in log space: log a_i = log f + sum_j [D_ij log p_j + (1 - D_ij) log(1 - p_j)],
        # log b_i = log(1 - f) + sum_j [(1 - D_ij) log q_j + D_ij log(1 - q_j)].
        # W = sigmoid(log a - log b), and log a - log b is affine in D: one bmm per iteration.
        lp, l1p, lq, l1q = torch.log(p), torch.log1p(-p), torch.log(q), torch.log1p(-q)
        offset = log_odds_prior + (l1p - lq).sum(1)  # (B,)
        slope = (lp - l1p) - (l1q - lq)  # (B, K)
        w = torch.sigmoid(torch.baddbmm(offset[:, None, None], slope[:, None, :], d)[:, 0])
        # M-step: p_j = sum W D_j / sum W ; q_j = sum (1 - W)(1 - D_j) / sum (1 - W).
        cw = w if counts is None else w * counts
        sum_w = cw.sum(1, keepdim=True)
        sum_1mw = npix - sum_w
        w_d = torch.bmm(d, cw[:, :, None])[:, :, 0]  # (B, K): sum_i W_i D_ij
        p_new = (w_d / sum_w.clamp_min(1e-12)).clamp(eps, 1.0 - eps)
        q_new = ((sum_1mw - (d_sum - w_d)) / sum_1mw.clamp_min(1e-12)).clamp(eps, 1.0 - eps)
        delta = torch.maximum((p_new - p).abs().amax(1), (q_new - q).abs().amax(1))
        post = torch.where(active[:, None], w, post)
        p = torch.where(active[:, None], p_new, p)
        q = torch.where(active[:, None], q_new, q)
        iters += active.to(torch.int64)
        active = active & (delta >= tol)
        if not bool(active.any()):
            break
    return StapleResult(post.float(), p.float(), q.float(), iters)


def staple_em(
    decisions: Tensor, *, eps: float = 1e-6, tol: float = 1e-5, max_iter: int = 100
) -> StapleResult:
    """STAPLE EM (Warfield et al. 2004) for B independent binary problems.

    decisions: (B, K, P) {0, 1} (any dtype). Each problem b has its own prior f_b (its mean
    vote), sensitivities p_kb and specificities q_kb (initialised at 0.99, clamped to
    [eps, 1 - eps]). A problem stops updating once its largest parameter change is below
    `tol` (or after `max_iter`), so its result does not depend on which other problems
    share the batch: this is what makes `staple` chunk-invariant. Public so reports and
    tests can inspect the rater estimates.

    The posterior depends on a pixel only through its vote pattern, so for K <= 16 with
    fewer patterns (2^K) than pixels the EM runs on per-image pattern counts (sufficient
    statistics) instead of pixels: the same estimates, many times faster."""
    if decisions.ndim != 3:
        raise ValueError(f"decisions must have shape (B, K, P), got {tuple(decisions.shape)}")
    b, k, npix = decisions.shape
    dev = decisions.device
    opts = {"eps": eps, "tol": tol, "max_iter": max_iter}
    if k > 16 or 2**k >= npix:
        return _staple_core(decisions.to(torch.float32).contiguous(), None, **opts)
    codes = vote_codes(decisions.transpose(0, 1))  # (B, P)
    n_pat = 2**k
    offsets = torch.arange(b, device=dev)[:, None] * n_pat
    counts = torch.bincount((codes + offsets).flatten(), minlength=b * n_pat)  # int64 sum
    res = staple_patterns(counts.reshape(b, n_pat), k, **opts)
    return res._replace(posterior=torch.gather(res.posterior, 1, codes.long()))


def vote_codes(decisions: Tensor) -> Tensor:
    """(K, ...) {0, 1} decisions -> (...) vote patterns, model j as bit j, in the narrowest
    signed integer that holds them (int16 for K < 16): less memory traffic than int64."""
    k = decisions.shape[0]
    if k > 63:
        raise ValueError(f"a vote pattern holds at most 63 models, got {k}")
    dtype = torch.int16 if k <= 15 else torch.int32 if k <= 31 else torch.int64
    codes = torch.zeros(decisions.shape[1:], dtype=dtype, device=decisions.device)
    for j in range(k):
        d = decisions[j] if decisions.dtype == torch.bool else decisions[j] != 0
        codes |= d.to(dtype) << j
    return codes


def staple_patterns(
    counts: Tensor, k: int, *, eps: float = 1e-6, tol: float = 1e-5, max_iter: int = 100
) -> StapleResult:
    """STAPLE EM from per-problem vote-pattern counts (B, 2^K) (integers, as from
    `torch.bincount` of `vote_codes`); the posterior is per pattern, (B, 2^K).

    The counts are the EM's sufficient statistics, so callers that know how many pixels
    share a pattern (e.g. the evaluator's agreement pixels) need not materialise them."""
    n_pat = 2**k
    if counts.ndim != 2 or counts.shape[1] != n_pat:
        raise ValueError(f"counts must have shape (B, {n_pat}), got {tuple(counts.shape)}")
    b, dev = counts.shape[0], counts.device
    bits = (torch.arange(n_pat, device=dev)[None, :] >> torch.arange(k, device=dev)[:, None]) & 1
    patterns = bits.to(torch.float32)[None].expand(b, k, n_pat).contiguous()  # (B, K, 2^K)
    return _staple_core(patterns, counts.to(torch.float64), eps=eps, tol=tol, max_iter=max_iter)


def staple(
    probs: Tensor,
    *,
    weights: WeightsLike = None,
    threshold: float = 0.5,
    eps: float = 1e-6,
    tol: float = 1e-5,
    max_iter: int = 100,
) -> Tensor:
    """STAPLE label fusion of the models' hard decisions (p > threshold, or argmax).

    Weights each model by its EM-estimated sensitivity/specificity instead of trusting all
    equally. Binary: one EM per image, prior = the image's mean vote, returns P(foreground).
    Multiclass: one-vs-rest per class (each class one binary EM per image); the per-class
    posteriors are the scores and `to_labels` takes their argmax."""
    probs = _as_probs(probs)
    k, n, c, h, w = probs.shape
    votes = _model_votes(probs, threshold)  # (K, N, H, W)
    # Kept as bool (1 byte) until staple_em picks pixel or vote-pattern mode.
    if c == 1:
        decisions = votes.bool().permute(1, 0, 2, 3).reshape(n, k, h * w)
    else:
        one_vs_rest = torch.stack([votes == cls for cls in range(c)], dim=2)  # (K, N, C, H, W)
        decisions = one_vs_rest.permute(1, 2, 0, 3, 4).reshape(n * c, k, h * w)
    post = staple_em(decisions, eps=eps, tol=tol, max_iter=max_iter).posterior
    return _finish(post.reshape(n, c, h, w))


def to_labels(scores: Tensor, threshold: float = 0.5) -> Tensor:
    """Scores (N, C, H, W) -> uint8 labels (N, H, W): binary `score > threshold` (strict, so a
    hard-vote tie is background); multiclass argmax (threshold ignored, ties -> lowest class)."""
    scores = torch.as_tensor(scores)
    if scores.ndim != 4:
        raise ValueError(f"scores must have shape (N, C, H, W), got {tuple(scores.shape)}")
    if scores.shape[1] == 1:
        return (scores[:, 0] > threshold).to(torch.uint8)
    return _argmax_uint8(scores, 1)


def disagreement(probs: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-pixel model disagreement (N, H, W) in [0, 1] for uncertainty overlays.

    Defined on the models' hard votes (p > threshold, or argmax) as
    `(1 - modal fraction) / (1 - 1 / min(K, classes))` with classes = 2 in binary mode:
    0 where all models agree, 1 for the most even split possible (binary: half the models
    each way, i.e. 2 * minority fraction). For odd K the maximum reached is below 1
    (K = 3: a 2-1 split gives 2/3). K = 1 gives zeros. Vote-based rather than a probability
    std so it shows where the *decisions* differ, which is what changes the fused mask."""
    probs = _as_probs(probs)
    k, _, c, _, _ = probs.shape
    classes = 2 if c == 1 else c
    votes = _model_votes(probs, threshold)
    if k == 1:
        return torch.zeros(votes.shape[1:], dtype=torch.float32, device=probs.device)
    modal = _vote_fractions(votes, classes).amax(dim=1)
    return ((1.0 - modal) / (1.0 - 1.0 / min(k, classes))).clamp_(0.0, 1.0)
