"""Tiny synthetic prediction stores for the ensemble tests (and the benchmark)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spineseg.ensemble.store import PredictionStore

SIZES = {"val": 4, "test": 5, "external": 3}


def blob_masks(
    n: int, shape: tuple[int, int], rng: np.random.Generator, classes: int = 1
) -> np.ndarray:
    """Random ellipses; with classes > 1 the ellipse is cut into horizontal bands 1..classes
    (a stand-in for Th8..Th11 stacked along the spine)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.15, 0.3) * w
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if classes == 1:
            out[i][inside] = 1
        else:
            band = np.clip(((yy - (cy - ry)) / (2 * ry) * classes).astype(int), 0, classes - 1)
            out[i][inside] = band[inside] + 1
    return out


def noisy_probs(
    masks: np.ndarray, channels: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Probabilities of a model that is right up to `noise` (logit-space Gaussian noise)."""
    if channels == 1:
        logits = 3.0 * (2.0 * masks[:, None].astype(np.float32) - 1.0)
        logits += noise * rng.standard_normal(logits.shape).astype(np.float32)
        return 1.0 / (1.0 + np.exp(-logits))
    onehot = np.eye(channels, dtype=np.float32)[masks].transpose(0, 3, 1, 2)
    logits = 3.0 * onehot + noise * rng.standard_normal(onehot.shape).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def make_store(
    run_dir: str | Path,
    models: Sequence[str] = ("m0", "m1", "m2"),
    sizes: Mapping[str, int] = SIZES,
    shape: tuple[int, int] = (32, 32),
    channels: int = 1,
    noise: Sequence[float] | None = None,
    spacing: tuple[float, float] | None = (0.5, 0.5),
    images: bool = True,
    seed: int = 0,
) -> PredictionStore:
    """A complete store: truth + every model on every split of `sizes`; model i has noise
    `noise[i]` (default increasing, so m0 is the best on validation)."""
    rng = np.random.default_rng(seed)
    store = PredictionStore(run_dir)
    noise = list(noise or [1.5 + 1.0 * i for i in range(len(models))])
    classes = 1 if channels == 1 else channels - 1
    for split, n in sizes.items():
        masks = blob_masks(n, shape, rng, classes)
        ids = [f"{split}-{i:03d}" for i in range(n)]
        film = rng.integers(0, 256, size=masks.shape, dtype=np.uint8) if images else None
        store.write_truth(split, masks, ids, images=film, spacing=spacing)
        for model, sigma in zip(models, noise, strict=True):
            store.write_probs(model, split, noisy_probs(masks, channels, sigma, rng), ids)
    for model in models:
        write_manifest(store, model, splits=list(sizes))
    return store


def write_manifest(
    store: PredictionStore,
    model: str,
    status: str = "complete",
    splits: Sequence[str] = tuple(SIZES),
    error: str | None = None,
) -> None:
    store.write_manifest(
        model,
        {
            "model": model,
            "status": status,
            "preset": {"arch": "Unet", "encoder": "tiny", "weights": None},
            "target": "region",
            "config": {},
            "config_hash": "0",
            "checkpoint": None,
            "val_metrics": {},
            "splits": list(splits),
            "error": error,
            "started_at": None,
            "finished_at": None,
            "elapsed_s": 0.0,
        },
    )
