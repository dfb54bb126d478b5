"""Per-image segmentation metrics on label maps: overlap (Dice, IoU, precision, recall) and
surface distances (HD95, ASSD).

Pure numpy/scipy so the evaluator can score every rule and model per image and the stats
layer can bootstrap over images; torch tensors are accepted and converted.

Inputs are integer label maps (N, H, W), 0 = background. `num_classes == 2` is binary mode
(foreground = any nonzero label); otherwise classes 1..num_classes-1 are scored one by one.

Conventions (per image, per foreground class)
- Overlap: prediction and truth both empty -> dice = iou = precision = recall = 1 (nothing
  to find, nothing found); exactly one empty -> all four = 0. Multiclass values are the mean
  over classes 1..num_classes-1, so a class absent from both counts as a perfect 1.
- Surface: edges = mask XOR binary_erosion(mask) (cross structure, pixels outside the image
  count as background), exactly as `monai.metrics.utils.get_mask_edges`; distances are exact
  Euclidean, in mm when `spacing` (row, col) is given. HD95 = max of the two directed 95th
  percentiles (linear interpolation, like MONAI's `torch.quantile`); ASSD = mean of both
  directed distance sets concatenated. These agree with MONAI's
  `compute_hausdorff_distance(percentile=95)` and
  `compute_average_surface_distance(symmetric=True)`.
- Surface, empties: both empty -> 0; exactly one empty -> the image diagonal
  hypot(H * row_spacing, W * col_spacing), a finite worst-case penalty (MONAI gives inf/nan)
  so means over images stay finite. Multiclass values are the mean over foreground classes
  present in prediction or truth (0 if there are none).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage

__all__ = ["overlap_from_counts", "overlap_metrics", "overlap_scores", "surface_metrics"]

ArrayLike = np.ndarray | torch.Tensor

OVERLAP_KEYS = ("dice", "iou", "precision", "recall")
SURFACE_KEYS = ("hd95", "assd")


def _as_labels(x: ArrayLike, name: str) -> np.ndarray:
    """(N, H, W) integer numpy array; a single (H, W) map is treated as N = 1."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {x.shape}")
    if x.dtype == bool:
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {x.dtype}")
    return x


def _pair(pred: ArrayLike, truth: ArrayLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_labels(pred, "pred"), _as_labels(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if num_classes > 2:
        for name, a in (("pred", p), ("truth", t)):
            if a.size and (a.min() < 0 or a.max() >= num_classes):
                raise ValueError(
                    f"{name} labels must lie in [0, {num_classes - 1}], got [{a.min()}, {a.max()}]"
                )
    return p, t


def _class_masks(p: np.ndarray, t: np.ndarray, num_classes: int):
    """Yield (pred_mask, truth_mask) per foreground class, as bool (N, H, W)."""
    if num_classes == 2:
        yield p != 0, t != 0
        return
    for c in range(1, num_classes):
        yield p == c, t == c


def _binary_overlap(pm: ArrayLike, tm: ArrayLike) -> dict[str, ArrayLike]:
    """Per-image counts -> the four overlap scores with the empty conventions (numpy or
    torch: the sums read the same in both)."""
    return overlap_from_counts((pm & tm).sum((1, 2)), pm.sum((1, 2)), tm.sum((1, 2)))


def overlap_from_counts(tp: ArrayLike, ps: ArrayLike, ts: ArrayLike) -> dict[str, ArrayLike]:
    """Per-image Dice, IoU, precision and recall from the pixel counts: true positives,
    predicted and true foreground (each (N,)); both empty scores 1 (module docstring).

    numpy in, float64 numpy out; torch in, torch out on the counts' own device (float64,
    float32 on MPS), so training's validation Dice never waits for a copy to the host."""
    if isinstance(tp, torch.Tensor):
        dtype = torch.float32 if tp.device.type == "mps" else torch.float64
        tp, ps, ts = (torch.as_tensor(v, device=tp.device).to(dtype) for v in (tp, ps, ts))
        where, at_least = torch.where, torch.clamp_min
    else:
        tp, ps, ts = (np.asarray(v, dtype=np.float64) for v in (tp, ps, ts))
        where, at_least = np.where, np.maximum
    both_empty = (ps == 0) & (ts == 0)

    def ratio(num: ArrayLike, den: ArrayLike) -> ArrayLike:
        return where(both_empty, 1.0, where(den > 0, num / at_least(den, 1.0), 0.0))

    return {
        "dice": ratio(2 * tp, ps + ts),
        "iou": ratio(tp, ps + ts - tp),
        "precision": ratio(tp, ps),
        "recall": ratio(tp, ts),
    }


def overlap_scores(p: ArrayLike, t: ArrayLike, num_classes: int) -> dict[str, ArrayLike]:
    """`overlap_metrics` without its checks and conversion: (N, H, W) labels as numpy, or
    as torch tensors that stay where they are (the training metric's core)."""
    total: dict[str, ArrayLike] = {}
    n_fg = 0
    for pm, tm in _class_masks(p, t, num_classes):
        for k, v in _binary_overlap(pm, tm).items():
            total[k] = v if k not in total else total[k] + v
        n_fg += 1
    return {k: v / n_fg for k, v in total.items()}


def overlap_metrics(pred: ArrayLike, truth: ArrayLike, num_classes: int) -> dict[str, np.ndarray]:
    """Per-image dice/iou/precision/recall, each (N,) float64 (conventions: module docstring)."""
    p, t = _pair(pred, truth, num_classes)
    return overlap_scores(p, t, num_classes)


def _spacings(spacing: object, n: int) -> np.ndarray:
    """Normalise `spacing` to an (N, 2) float array of (row, col) pixel sizes."""
    if spacing is None:
        return np.ones((n, 2))
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full((n, 2), float(sp))
    elif sp.shape == (2,):
        sp = np.broadcast_to(sp, (n, 2))
    elif sp.shape != (n, 2):
        raise ValueError(f"spacing must be a scalar, (row, col) or shape ({n}, 2), got {sp.shape}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be finite and positive, got {sp.tolist()}")
    return sp


def _edges(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels as MONAI defines them: mask XOR its cross-shaped erosion."""
    return mask ^ ndimage.binary_erosion(mask)


def _surface_one(
    pm: np.ndarray, tm: np.ndarray, spacing: Sequence[float], diag: float
) -> tuple[float, float]:
    """(hd95, assd) for one image and one class; bool (H, W) masks."""
    p_any, t_any = bool(pm.any()), bool(tm.any())
    if not p_any and not t_any:
        return 0.0, 0.0
    if p_any != t_any:
        return diag, diag
    # Crop to the union's bounding box plus a one-pixel margin: the erosion there matches the
    # full image's (zero border) and every edge pixel is inside, so distances are unchanged
    # while the distance transforms run on far fewer pixels.
    rows = np.flatnonzero((pm | tm).any(axis=1))
    cols = np.flatnonzero((pm | tm).any(axis=0))
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, pm.shape[0])
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, pm.shape[1])
    ep, et = _edges(pm[r0:r1, c0:c1]), _edges(tm[r0:r1, c0:c1])
    to_truth = ndimage.distance_transform_edt(~et, sampling=spacing)[ep]
    to_pred = ndimage.distance_transform_edt(~ep, sampling=spacing)[et]
    hd95 = max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))
    assd = (to_truth.sum() + to_pred.sum()) / (to_truth.size + to_pred.size)
    return float(hd95), float(assd)


def surface_metrics(
    pred: ArrayLike,
    truth: ArrayLike,
    num_classes: int,
    spacing: float | Sequence[float] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-image HD95 and ASSD, each (N,) float64, in pixels or in the units of `spacing`
    ((row, col) for all images, or an (N, 2) array); conventions: module docstring."""
    p, t = _pair(pred, truth, num_classes)
    n, h, w = p.shape
    sp = _spacings(spacing, n)
    out = {k: np.zeros(n) for k in SURFACE_KEYS}

    def one(i: int) -> list[tuple[float, float]]:
        diag = float(np.hypot(h * sp[i, 0], w * sp[i, 1]))
        return [
            _surface_one(pm[0], tm[0], tuple(sp[i]), diag)
            for pm, tm in _class_masks(p[i : i + 1], t[i : i + 1], num_classes)
            if pm.any() or tm.any()
        ]

    # scipy's erosion and distance transform release the GIL: images run on threads.
    pool = _pool() if n > 1 else None
    for i, vals in enumerate(pool.map(one, range(n)) if pool else map(one, range(n))):
        if vals:
            out["hd95"][i] = np.mean([v[0] for v in vals])
            out["assd"][i] = np.mean([v[1] for v in vals])
    return out


@functools.cache
def _pool() -> ThreadPoolExecutor | None:
    """One thread per CPU this process may use (its affinity, so SLURM's allocation);
    None on a single CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return ThreadPoolExecutor(cpus, thread_name_prefix="spineseg-surface") if cpus > 1 else None


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


# ---------------------------------------------------------------------- level errors
LEVEL_KEYS = ("level_offset", "level_error", "four_in_order")
#: An offset above half a vertebra pitch puts the region on the wrong vertebrae.
LEVEL_ERROR_PITCHES = 0.5


def _centroids(masks: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts (n,) and centroids (n, 2) as (row, col) scaled by `scale` (n, 2);
    NaN for an empty mask."""
    _, h, w = masks.shape
    rows = masks.sum(2, dtype=np.int64)  # (n, H)
    cols = masks.sum(1, dtype=np.int64)  # (n, W)
    count = rows.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = rows @ np.arange(h, dtype=np.float64) / count
        c = cols @ np.arange(w, dtype=np.float64) / count
    return count, np.stack([r, c], 1) * scale


def spine_axis(vertebrae: ArrayLike, spacing: object = None) -> dict[str, np.ndarray]:
    """Per image: the truth region's centroid, the unit vector of the spine's axis (Th8's
    centroid towards Th11's) and the vertebra pitch (a third of the Th8-to-Th11 distance).

    vertebrae: (n, H, W) labels 1..4 = Th8..Th11. Coordinates are in mm when the spacing is
    known (so stretched films are measured isotropically), else in pixels. An image without
    Th8 or Th11 gets NaN: its level cannot be measured."""
    v = _as_labels(vertebrae, "vertebrae")
    n = v.shape[0]
    scale = np.ones((n, 2))
    if spacing is not None:
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (n, 2))
        known = (np.isfinite(sp) & (sp > 0)).all(1)
        scale[known] = sp[known]
    _, top = _centroids(v == 1, scale)
    _, bottom = _centroids(v == 4, scale)
    _, centre = _centroids(v > 0, scale)
    axis = bottom - top
    length = np.hypot(axis[:, 0], axis[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = axis / length[:, None]
        pitch = np.where(length > 0, length / 3.0, np.nan)
    return {"centre": centre, "unit": unit, "pitch": pitch, "scale": scale}


def level_metrics(pred: ArrayLike, axis: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: `level_offset`, the signed distance from the truth region's centroid to the
    predicted region's (any nonzero label), along the spine's axis, in vertebra pitches
    (positive = towards Th11, i.e. too low); `level_error` = 1 where |offset| > 0.5 pitch or
    nothing was predicted, else 0; both NaN where the truth has no Th8 or Th11.

    `four_in_order` (vertebrae mode, 5 classes): 1 where each of Th8..Th11 is exactly one
    connected body and their centroids follow top to bottom along the axis; NaN for region
    labels."""
    p = _as_labels(pred, "pred")
    count, centre = _centroids(p > 0, axis["scale"])
    offset = np.einsum("ij,ij->i", centre - axis["centre"], axis["unit"]) / axis["pitch"]
    known = np.isfinite(axis["pitch"])
    error = np.where(
        known, ((count == 0) | (np.abs(np.nan_to_num(offset)) > LEVEL_ERROR_PITCHES)), np.nan
    ).astype(np.float64)
    offset = np.where(known & (count > 0), offset, np.nan)
    order = np.full(len(p), np.nan)
    if p.size and int(p.max()) > 1:
        order = np.array([_four_in_order(p[i], axis, i) for i in range(len(p))], np.float64)
    return {"level_offset": offset, "level_error": error, "four_in_order": order}


def _four_in_order(labels: np.ndarray, axis: dict[str, np.ndarray], i: int) -> float:
    if not np.isfinite(axis["pitch"][i]):
        return np.nan
    positions = []
    for value in range(1, 5):
        body = labels == value
        _, parts = ndimage.label(body, structure=np.ones((3, 3)))
        if parts != 1:
            return 0.0
        _, c = _centroids(body[None], axis["scale"][i : i + 1])
        positions.append(float(c[0] @ axis["unit"][i]))
    return float(all(a < b for a, b in itertools.pairwise(positions)))
