"""Exact scoring of a binary ensemble that computes the rules only where the models disagree.

Every binary rule fuses a pixel's K probabilities into a score that lies between their
minimum and maximum: a mean, a weighted mean, the median, the maximum, a vote fraction or a
mean logit. Where every model says p > t the fused label is therefore foreground, and where
every model says p <= t it is background, whatever the rule. Only the pixels where the
models disagree need the rule itself. For trained networks that is a band along the
boundary, a few per cent of the image, and the overlap metrics then follow from per-image
counts. STAPLE depends on an image only through its vote-pattern counts, so its agreement
pixels enter it as two counts.

The labels are the ones `voting.fuse_labels` gives when it fuses every pixel (the tests
compare the two paths on random stores). The evaluator keeps that dense path for vertebrae
mode, for chunks holding values outside [0, 1] (so that the store's error names the model
and image), and for dtypes other than float16 and float32.

Comparisons run on integer keys. A non-negative IEEE float's bit pattern, read as a signed
integer of the same width, orders exactly as its value, so the min/max and threshold tests
on the stored float16 need no conversion to float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spineseg.ensemble import voting

__all__ = [
    "KEY_DTYPES",
    "Method",
    "Scored",
    "dense_labels",
    "score_chunk",
    "score_raw",
    "threshold_key",
    "value_key",
]

#: Stored dtype -> the integer dtype its keys are read as.
KEY_DTYPES: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float16): torch.int16,
    np.dtype(np.float32): torch.int32,
}
_VALUE_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
_INT = {np.dtype(np.float16): np.int16, np.dtype(np.float32): np.int32}

#: Rules scored here; a rule added to `voting.RULES` but not here goes to the dense path.
SUPPORTED = frozenset({"soft", "weighted", "logit_mean", "max", "median", "hard", "staple"})


@dataclass(frozen=True)
class Method:
    """One scored prediction: a voting rule (`rule`) or a single model (`model`, its index)."""

    name: str
    threshold: float
    rule: str | None = None
    model: int | None = None


@dataclass
class Scored:
    """Per-image counts of one method on one chunk (and its labels when asked for)."""

    tp: Tensor  # (n,) int64: predicted and true foreground pixels
    ps: Tensor  # (n,) int64: predicted foreground pixels
    labels: Tensor | None = None  # (n, P) bool


def value_key(value: float, dtype: np.dtype | type) -> int:
    """The key of `value` stored as `dtype`."""
    dtype = np.dtype(dtype)
    return int(np.array(value, dtype=dtype).view(_INT[dtype]))


def threshold_key(t: float, dtype: np.dtype | type) -> int:
    """The largest key whose value is <= float32(t), so that p > t <=> key(p) > this key.

    float32(t) because the dense path compares float32 probabilities with `t`, which torch
    rounds to float32 first."""
    dtype = np.dtype(dtype)
    t32 = np.float32(t)
    v = np.array(t32, dtype=dtype)
    if np.float32(v) > t32:  # rounded up to the next float16: step back one
        v = np.nextafter(v, np.array(-np.inf, dtype=dtype))
    return int(v.view(_INT[dtype]))


def _count(x: Tensor, dim: int) -> Tensor:
    """True values of a bool tensor along `dim`, as int64. Summing its uint8 view into
    int32 is faster on CPU than summing bool into int64 (2x along a row, ~60x across
    models, measured)."""
    return x.view(torch.uint8).sum(dim, dtype=torch.int32).to(torch.int64)


def _image_counts(x: Tensor, bounds: Sequence[tuple[int, int]]) -> Tensor:
    """True values of bool x (R, M) in each image's contiguous run of columns -> (R, n)."""
    if not bounds:
        return torch.zeros(x.shape[0], 0, dtype=torch.int64)
    return torch.stack([_count(x[:, a:b], 1) for a, b in bounds], 1)


def _gather_columns(x: Tensor, idx: Tensor) -> Tensor:
    """x[:, idx] for a (K, L) tensor, row by row: each row's gather then reads one
    contiguous row (about 2x faster than a 2-D index_select on CPU)."""
    out = torch.empty((x.shape[0], idx.numel()), dtype=x.dtype)
    for j in range(x.shape[0]):
        torch.index_select(x[j], 0, idx, out=out[j])
    return out


def score_chunk(
    keys: Tensor,
    truth: Tensor,
    methods: Sequence[Method],
    weights: Tensor | None,
    dtype: np.dtype | type,
    want_labels: bool = False,
) -> dict[str, Scored] | None:
    """Score every method on one chunk, or None when the chunk needs the dense path: a value
    outside [0, 1], or STAPLE where the dense rule runs pixel-wise EM (K > 16 or 2^K >= P).

    keys: (K, n, P) integer keys (`KEY_DTYPES`) of the K models' probabilities for n images
    of P pixels; truth: (n, P) bool. None hands the chunk to the dense path, which raises the
    store's error naming the model and image for NaN, inf or out-of-range values."""
    dtype = np.dtype(dtype)
    k, n, npix = keys.shape
    if (k > 16 or 2**k >= npix) and any(m.rule == "staple" for m in methods):
        return None  # the dense STAPLE runs pixel-wise EM there: same numbers only that way
    lo, hi = keys.amin(0), keys.amax(0)  # two int reductions beat one aminmax on CPU
    if bool(lo.min() < 0) or bool(hi.max() > value_key(1.0, dtype)):
        return None
    ts = _count(truth, 1)
    out: dict[str, Scored] = {}
    by_threshold: dict[int, list[Method]] = {}
    for m in methods:
        by_threshold.setdefault(threshold_key(m.threshold, dtype), []).append(m)
    flat_keys = keys.reshape(k, n * npix)
    for tk, group in by_threshold.items():
        fg = lo > tk  # every model above t
        split = (hi > tk) & ~fg  # the models disagree
        idx = split.reshape(-1).nonzero().squeeze(1)  # ascending, so images are contiguous runs
        split_n = _count(split, 1)
        ends = split_n.cumsum(0).tolist()
        bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        sub = _gather_columns(flat_keys, idx)  # (K, M)
        votes = sub > tk
        count = votes.view(torch.uint8).sum(0, dtype=torch.uint8 if k < 256 else torch.int32)
        t_sub = truth.reshape(-1).index_select(0, idx)
        fg_n = _count(fg, 1)
        fg_t = _count(fg & truth, 1)
        needs_values = any(
            m.rule in ("soft", "weighted", "logit_mean") or (m.rule == "median" and k % 2 == 0)
            for m in group
        )
        values = sub.view(_VALUE_DTYPES[dtype]).to(torch.float32) if needs_values else None

        rule_rows: list[Tensor] = []
        row_of: dict[str, tuple[str, int]] = {}  # method -> ("vote" | "rule", row)
        flips: dict[str, tuple[Tensor, Tensor]] = {}  # STAPLE's labels of the agreement patterns
        for m in group:
            if m.model is not None:
                row_of[m.name] = ("vote", m.model)
                continue
            if m.rule == "hard":
                lab = count > k // 2  # a strict majority: 2c > K
            elif m.rule == "max":
                lab = torch.ones_like(count, dtype=torch.bool)  # some model is above t
            elif m.rule == "median":
                lab = _median_labels(votes, count, values, m.threshold)
            elif m.rule in ("soft", "weighted", "logit_mean"):
                lab = voting.fuse_labels(
                    m.rule, values.reshape(k, 1, 1, 1, -1), weights, m.threshold
                ).reshape(-1)
            elif m.rule == "staple":
                lab, flips[m.name] = _staple_labels(votes, split_n, fg_n, npix, k)
            else:
                raise ValueError(f"no agreement scoring for rule {m.rule!r}")
            row_of[m.name] = ("rule", len(rule_rows))
            rule_rows.append(lab.to(torch.bool))
        rows = {"vote": votes}
        if rule_rows:
            rows["rule"] = torch.stack(rule_rows)
        if not any(kind == "vote" for kind, _ in row_of.values()):
            rows.pop("vote")
        sub_ps = {kind: _image_counts(x, bounds) for kind, x in rows.items()}
        sub_tp = {kind: _image_counts(x & t_sub, bounds) for kind, x in rows.items()}
        split_t = _image_counts(t_sub[None], bounds)[0]
        bg_n = npix - fg_n - split_n
        bg_t = ts - fg_t - split_t
        for m in group:
            kind, j = row_of[m.name]
            tp, ps = fg_t + sub_tp[kind][j], fg_n + sub_ps[kind][j]
            labels = None
            if m.name in flips:  # STAPLE: pattern "all 0" / "all 1" labels per image
                on_bg, on_fg = flips[m.name]
                tp = on_fg * fg_t + on_bg * bg_t + sub_tp[kind][j]
                ps = on_fg * fg_n + on_bg * bg_n + sub_ps[kind][j]
                if want_labels:
                    labels = torch.where(fg, on_fg[:, None], on_bg[:, None] & ~split)
            elif want_labels:
                labels = fg.clone()
            if labels is not None:
                labels.view(-1)[idx] = rows[kind][j]
            out[m.name] = Scored(tp, ps, labels)
    return out


def dense_labels(probs: Tensor, method: Method, weights: Tensor | None) -> Tensor:
    """(n, H, W) uint8 labels of one method from fusing every pixel of a float32
    (K, n, C, H, W) chunk: the reference path, and the one vertebrae mode takes."""
    if method.model is not None:
        return voting.to_labels(probs[method.model], method.threshold)
    return voting.fuse_labels(method.rule, probs, weights, threshold=method.threshold)


def score_raw(
    raw: np.ndarray,
    truth: np.ndarray,
    methods: Sequence[Method],
    weights: Tensor | None,
    want_labels: bool = False,
) -> tuple[dict[str, Scored], Tensor] | None:
    """`score_chunk` on a chunk as the store's reader yields it, (K, n, 1, H, W) float16 or
    float32 (writeable), with (n, H, W) truth labels; also returns the per-image truth
    counts. None when the chunk needs the dense path (vertebrae mode, another dtype, an
    unsupported rule, or values outside [0, 1])."""
    dtype = raw.dtype
    if (
        dtype not in KEY_DTYPES
        or raw.ndim != 5
        or raw.shape[2] != 1
        or any(m.rule is not None and m.rule not in SUPPORTED for m in methods)
    ):
        return None
    k, n = raw.shape[:2]
    keys = torch.from_numpy(raw).view(KEY_DTYPES[dtype]).reshape(k, n, -1)
    fg = torch.from_numpy(np.ascontiguousarray(truth != 0)).reshape(n, -1)
    scored = score_chunk(keys, fg, methods, weights, dtype, want_labels)
    return None if scored is None else (scored, _count(fg, 1))


def _median_labels(votes: Tensor, count: Tensor, values: Tensor | None, t: float) -> Tensor:
    """median > t from the vote counts; an even K's exact tie needs the two middle values.

    Odd K: the middle value exceeds t iff a majority does. Even K: with more than K/2 votes
    both middle values exceed t, with fewer neither does; with exactly K/2 the lower middle
    is the largest value <= t and the upper the smallest value > t, averaged as the dense
    rule does."""
    k = votes.shape[0]
    lab = count > k // 2  # 2c > K
    if k % 2:
        return lab
    tie = (count == k // 2).nonzero().squeeze(1)
    if tie.numel():
        v = values.index_select(1, tie)
        up = votes.index_select(1, tie)
        upper = torch.where(up, v, torch.inf).amin(0)
        lower = torch.where(up, -torch.inf, v).amax(0)
        lab[tie] = ((lower + upper) / 2).clamp_(0.0, 1.0) > t
    return lab


def _staple_labels(
    votes: Tensor, split_n: Tensor, fg_n: Tensor, npix: int, k: int
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """STAPLE per image from pattern counts: the disagreement pixels' own codes plus the
    agreement pixels as pattern 0 (all background) and pattern 2^K - 1 (all foreground).

    votes: (K, M) of the disagreement pixels, image by image (split_n of image i)."""
    n, n_pat = len(split_n), 2**k
    img = torch.repeat_interleave(torch.arange(n), split_n)
    codes = voting.vote_codes(votes)
    flat = img * n_pat + codes
    counts = torch.bincount(flat, minlength=n * n_pat).reshape(n, n_pat)
    counts[:, 0] += npix - fg_n - split_n
    counts[:, n_pat - 1] += fg_n
    post = voting.staple_patterns(counts, k).posterior.clamp(0.0, 1.0)
    on = post > 0.5
    return on.reshape(-1)[flat], (on[:, 0], on[:, n_pat - 1])
