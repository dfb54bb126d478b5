"""The one chunk scorer: every method's per-image overlap (and labels) on one chunk of images.

Validation scoring, threshold tuning, greedy selection, evaluation, the gallery and the
benchmark all score through `score_chunk`. It takes the agreement path (`agreement`: rules
evaluated only where the models disagree) when every method has a band kernel that applies,
and otherwise fuses every pixel (`rules.fuse_labels`). Both give the same labels
(`tests/test_rules.py`), so callers never choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spineseg.ensemble import agreement, metrics, rules, voting
from spineseg.ensemble.store import checked_float32

__all__ = ["Method", "MethodScore", "dense_labels", "score_chunk"]


@dataclass(frozen=True)
class Method:
    """One scored prediction: a voting rule (`rule`) or a single model (`model`, its index).
    `weights` (one per model) replace the chunk's shared weights for this method only, which
    is how greedy selection scores each candidate multiset."""

    name: str
    threshold: float
    rule: str | None = None
    model: int | None = None
    weights: tuple[float, ...] | None = None


@dataclass
class MethodScore:
    """One method on one chunk: per-image overlap (`metrics.OVERLAP_KEYS`) and labels."""

    overlap: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # (n, H, W), when asked for


def _weights(m: Method, shared: torch.Tensor | None) -> torch.Tensor | None:
    return shared if m.weights is None else torch.tensor(m.weights, dtype=torch.float32)


def dense_labels(probs: torch.Tensor, method: Method, weights: torch.Tensor | None) -> torch.Tensor:
    """(n, H, W) uint8 labels of one method from fusing every pixel of a float32
    (K, n, C, H, W) chunk: the reference path, and the one vertebrae mode takes."""
    if method.model is not None:
        return voting.to_labels(probs[method.model], method.threshold)
    return rules.fuse_labels(
        method.rule, probs, _weights(method, weights), threshold=method.threshold
    )


def _agreement(
    raw: np.ndarray,
    truth: np.ndarray,
    methods: Sequence[Method],
    weights: torch.Tensor | None,
    want_labels: bool,
) -> dict[str, MethodScore] | None:
    """The agreement path, or None where it does not apply (see the module docstring)."""
    if raw.dtype not in agreement.KEY_DTYPES or raw.ndim != 5 or raw.shape[2] != 1:
        return None
    k, n = raw.shape[:2]
    npix = int(np.prod(raw.shape[3:]))
    if not agreement.supports(methods, k, npix):
        return None
    keys = torch.from_numpy(raw).view(agreement.KEY_DTYPES[raw.dtype]).reshape(k, n, -1)
    fg = torch.from_numpy(np.ascontiguousarray(truth != 0)).reshape(n, -1)
    scored = agreement.score_keys(keys, fg, methods, weights, raw.dtype, want_labels)
    if scored is None:
        return None
    ts = fg.view(torch.uint8).sum(1, dtype=torch.int64)
    out = {}
    for m in methods:
        got = scored[m.name]
        labels = None if got.labels is None else got.labels.reshape(truth.shape).numpy()
        counts = (got.tp.numpy(), got.ps.numpy(), ts.numpy())  # the scores stay numpy
        out[m.name] = MethodScore(metrics.overlap_from_counts(*counts), labels)
    return out


def score_chunk(
    raw: np.ndarray,
    truth: np.ndarray,
    methods: Sequence[Method],
    weights: torch.Tensor | None,
    *,
    models: Sequence[str],
    split: str,
    ids: Sequence[str],
    want_labels: bool = False,
) -> dict[str, MethodScore]:
    """{method name: MethodScore} for a raw (K, n, C, H, W) chunk as the store's reader yields
    it (float16 or float32, writeable) and its (n, H, W) truth labels.

    `models`, `split` and `ids` name the chunk's rows in the store's error when a value is
    NaN, infinite or outside [0, 1]. The dense path always returns the labels."""
    fast = _agreement(raw, truth, methods, weights, want_labels)
    if fast is not None:
        return fast
    probs = checked_float32(raw, models, split, ids)
    num_classes = max(2, int(raw.shape[2]))
    out = {}
    for m in methods:
        labels = dense_labels(probs, m, weights).numpy()
        out[m.name] = MethodScore(metrics.overlap_metrics(labels, truth, num_classes), labels)
    return out
