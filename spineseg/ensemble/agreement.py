"""Exact scoring of a binary ensemble that computes the rules only where the models disagree.

Every binary rule fuses a pixel's K probabilities into a score that lies between their
minimum and maximum: a mean, a weighted mean, the median, the maximum, a vote fraction or a
mean logit. Where every model says p > t the fused label is therefore foreground, and where
every model says p <= t it is background, whatever the rule. Only the pixels where the
models disagree need the rule itself. For trained networks that is a band along the
boundary, a few per cent of the image, and the overlap metrics then follow from per-image
counts. STAPLE depends on an image only through its vote-pattern counts, so its agreement
pixels enter it as two counts.

Each rule says how it labels these pixels (its band kernel, in `rules`). The labels are the
ones `rules.fuse_labels` gives when it fuses every pixel (`tests/test_rules.py` compares the
two paths for every registered rule). `scoring.score_chunk` keeps that dense path for
vertebrae mode, for chunks holding values outside [0, 1] (so that the store's error names
the model and image), for dtypes other than float16 and float32, and for rules without a
kernel.

Comparisons run on integer keys. A non-negative IEEE float's bit pattern, read as a signed
integer of the same width, orders exactly as its value, so the min/max and threshold tests
on the stored float16 need no conversion to float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from spineseg.ensemble import rules

if TYPE_CHECKING:
    from spineseg.ensemble.scoring import Method

__all__ = ["KEY_DTYPES", "Band", "Scored", "score_keys", "supports", "threshold_key", "value_key"]

#: Stored dtype -> the integer dtype its keys are read as.
KEY_DTYPES: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float16): torch.int16,
    np.dtype(np.float32): torch.int32,
}
_VALUE_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
_INT = {np.dtype(np.float16): np.int16, np.dtype(np.float32): np.int32}


@dataclass
class Band:
    """The pixels of one chunk where the K models disagree at one threshold key, image by image
    (image i owns `split_n[i]` consecutive columns): what a rule's band kernel labels."""

    keys: Tensor  # (K, M) integer keys of the band's probabilities
    votes: Tensor  # (K, M) bool: p > threshold
    count: Tensor  # (M,) how many models vote foreground
    dtype: np.dtype
    split_n: Tensor  # (n,) band pixels per image
    fg_n: Tensor  # (n,) pixels where every model votes foreground
    npix: int  # pixels per image

    @property
    def k(self) -> int:
        return self.keys.shape[0]

    @cached_property
    def values(self) -> Tensor:
        """(K, M) float32 probabilities, decoded only for kernels that need them."""
        return self.keys.view(_VALUE_DTYPES[self.dtype]).to(torch.float32)


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


def supports(methods: Sequence[Method], k: int, npix: int) -> bool:
    """Whether every method of a chunk of K models and `npix` pixels per image can be
    scored here: a single model always, a rule when its kernel applies."""
    return all(m.rule is None or rules.get(m.rule).scores_band(k, npix) for m in methods)


def score_keys(
    keys: Tensor,
    truth: Tensor,
    methods: Sequence[Method],
    weights: Tensor | None,
    dtype: np.dtype | type,
    want_labels: bool = False,
) -> dict[str, Scored] | None:
    """Score every method on one chunk, or None when a value lies outside [0, 1] (the dense
    path then raises the store's error naming the model and image). Callers check
    `supports` first.

    keys: (K, n, P) integer keys (`KEY_DTYPES`) of the K models' probabilities for n images
    of P pixels; truth: (n, P) bool."""
    dtype = np.dtype(dtype)
    k, n, npix = keys.shape
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
        band = Band(sub, votes, count, dtype, split_n, fg_n, npix)

        rule_rows: list[Tensor] = []
        row_of: dict[str, tuple[str, int]] = {}  # method -> ("vote" | "rule", row)
        flips: dict[str, tuple[Tensor, Tensor]] = {}  # the labels of the unanimous pixels
        for m in group:
            if m.model is not None:
                row_of[m.name] = ("vote", m.model)
                continue
            w = weights if m.weights is None else torch.tensor(m.weights, dtype=torch.float32)
            got = rules.get(m.rule).band(band, m.threshold, w)
            if got.on_bg is not None:
                flips[m.name] = (got.on_bg, got.on_fg)
            row_of[m.name] = ("rule", len(rule_rows))
            rule_rows.append(got.labels.to(torch.bool))
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
            if m.name in flips:  # e.g. STAPLE: its labels of "all 0" / "all 1" per image
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
