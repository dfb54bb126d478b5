"""Temperature scaling, fitted on validation, for every model and every rule's fused score;
the expected calibration error (ECE) and reliability curves before and after, per split.

One temperature T per model or rule rescales its logits (binary: logit(p) / T; vertebrae:
log p / T, then softmax). T > 1 softens over-confident maps (segmentation networks are
"almost all 0.0001 or 0.9999"). Scaling is monotone and fixes p = 0.5, so a model's labels
at 0.5 do not change; predict reports calibrated probabilities and keeps its decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar

N_BINS = 15
#: Pixels used to fit one temperature (a strided sample of the validation split).
FIT_PIXELS = 2_000_000
_EPS = 1e-6


def scaled(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,C,H,W) probabilities with their logits divided by `temperature`."""
    probs = probs.float()
    if probs.shape[1] == 1:
        return torch.sigmoid(torch.logit(probs.clamp(_EPS, 1 - _EPS)) / temperature)
    return torch.softmax(torch.log(probs.clamp_min(_EPS)) / temperature, dim=1)


def _nll(probs: torch.Tensor, target: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of (M,C) probabilities for (M,) labels at `temperature`."""
    p = scaled(probs[..., None, None], temperature)[..., 0, 0]
    if p.shape[1] == 1:
        q = p[:, 0].clamp(_EPS, 1 - _EPS)
        y = target.float()
        return float(-(y * q.log() + (1 - y) * (1 - q).log()).mean())
    return float(-p.gather(1, target[:, None].long()).clamp_min(_EPS).log().mean())


def fit_temperature(probs: torch.Tensor, target: torch.Tensor) -> float:
    """The T in [0.05, 20] that minimises the NLL of (M,C) probabilities for (M,) labels."""
    res = minimize_scalar(
        lambda log_t: _nll(probs, target, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-3},
    )
    return float(np.exp(res.x))


class Reliability:
    """Streaming reliability bins: sum of confidence, of correctness and count per bin
    (binary: P(region) against the region; multiclass: top-class confidence)."""

    def __init__(self, n_bins: int = N_BINS) -> None:
        self.conf = np.zeros(n_bins)
        self.hit = np.zeros(n_bins)
        self.count = np.zeros(n_bins)

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        if probs.shape[1] == 1:
            conf, hit = probs[:, 0].flatten(), (target > 0).flatten().float()
        else:
            top = probs.max(dim=1)
            conf, hit = top.values.flatten(), (top.indices == target).flatten().float()
        n_bins = len(self.count)
        bins = (conf.clamp(0, 1) * n_bins).long().clamp_max(n_bins - 1).numpy()
        self.conf += np.bincount(bins, conf.double().numpy(), n_bins)
        self.hit += np.bincount(bins, hit.double().numpy(), n_bins)
        self.count += np.bincount(bins, minlength=n_bins)

    @property
    def ece(self) -> float:
        total = self.count.sum()
        if not total:
            return float("nan")
        return float(np.abs(self.conf - self.hit).sum() / total)

    def curve(self) -> dict[str, list[float]]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "confidence": (self.conf / self.count).tolist(),
                "accuracy": (self.hit / self.count).tolist(),
                "count": self.count.tolist(),
            }


def _labels(masks: np.ndarray, channels: int) -> torch.Tensor:
    m = torch.from_numpy(np.asarray(masks).astype(np.int64))
    return (m > 0).long() if channels == 1 else m


def _sources(spec: Any, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each model's and each rule's scores on one chunk (K,n,C,H,W)."""
    from spineseg.ensemble import rules
    from spineseg.names import model_method

    weights = torch.tensor(spec.weights, dtype=torch.float32)
    out = {model_method(m): chunk[k] for k, m in enumerate(spec.models)}
    for rule in spec.rules:
        out[rule] = rules.fuse(rule, chunk, weights=weights, threshold=spec.threshold)
    return out


def _chunks(data: Any, spec: Any, chunk_size: int):
    from spineseg.ensemble.store import iter_chunks, load_chunk

    arrays = [data.probs[m] for m in spec.models]
    for sl in iter_chunks(data.truth.n, chunk_size):
        chunk = torch.from_numpy(load_chunk(arrays, spec.models, data.split, data.truth.ids, sl))
        yield chunk, np.asarray(data.truth.masks[sl])


def fit(val: Any, spec: Any, chunk_size: int = 16) -> dict[str, float]:
    """One temperature per model (`model:<name>`) and per rule, on a strided sample of the
    validation pixels."""
    total = val.truth.n * int(np.prod(val.truth.masks.shape[1:]))
    stride = max(1, total // FIT_PIXELS)
    samples: dict[str, list[torch.Tensor]] = {}
    targets: list[torch.Tensor] = []
    offset = 0
    for chunk, masks in _chunks(val, spec, chunk_size):
        channels = chunk.shape[2]
        y = _labels(masks, channels).flatten()
        pick = torch.arange((-offset) % stride, len(y), stride)
        offset += len(y)
        targets.append(y[pick])
        for name, p in _sources(spec, chunk).items():
            flat = p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])
            samples.setdefault(name, []).append(flat[pick])
    target = torch.cat(targets)
    return {name: fit_temperature(torch.cat(parts), target) for name, parts in samples.items()}


def assess(
    splits: Mapping[str, Any], spec: Any, temperatures: Mapping[str, float], chunk_size: int = 16
) -> dict[str, dict[str, dict[str, Any]]]:
    """ECE and reliability curves before and after scaling, per split, model and rule."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split, data in splits.items():
        before: dict[str, Reliability] = {}
        after: dict[str, Reliability] = {}
        for chunk, masks in _chunks(data, spec, chunk_size):
            y = _labels(masks, chunk.shape[2])
            for name, p in _sources(spec, chunk).items():
                before.setdefault(name, Reliability()).update(p, y)
                after.setdefault(name, Reliability()).update(scaled(p, temperatures[name]), y)
        out[split] = {
            name: {
                "temperature": temperatures[name],
                "ece": before[name].ece,
                "ece_calibrated": after[name].ece,
                "curve": before[name].curve(),
                "curve_calibrated": after[name].curve(),
            }
            for name in before
        }
    return out
