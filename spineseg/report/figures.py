"""Figures of the ensemble study: Dice bars with CIs, per-image box plots, overlay gallery.

Every function takes DataFrames / arrays and an output path and writes one PNG atomically.
They draw on a bare Agg `Figure` (no pyplot state), so they are safe in headless jobs,
threads and Hydra callbacks, and a report module can call them with its own data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spineseg.names import BEST, MODEL_PREFIX
from spineseg.utils.io import atomic_open

BEST_COLOR = "#7f7f7f"
RULE_COLOR = "#1f77b4"
MODEL_COLOR = "#c6dbef"


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """PNG via a temporary file + rename, so a reader never sees half an image."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _color(method: str) -> str:
    if method == BEST:
        return BEST_COLOR
    return MODEL_COLOR if method.startswith(MODEL_PREFIX) else RULE_COLOR


def plot_dice_bars(results: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Mean Dice per method with its 95% CI, one panel per split of `results`."""
    splits = list(dict.fromkeys(results["split"]))
    width = max(6.0, 0.45 * results.groupby("split").size().max() + 2)
    fig = Figure(figsize=(width, 3.6 * len(splits)))
    for i, split in enumerate(splits, start=1):
        r = results[results["split"] == split]
        ax = fig.add_subplot(len(splits), 1, i)
        mean = r["dice_mean"].to_numpy(dtype=float)
        err = np.vstack(
            [
                mean - r["dice_ci_low"].to_numpy(dtype=float),
                r["dice_ci_high"].to_numpy(dtype=float) - mean,
            ]
        )
        x = np.arange(len(r))
        ax.bar(
            x,
            mean,
            yerr=np.nan_to_num(err.clip(min=0)),
            capsize=3,
            color=[_color(m) for m in r["method"]],
            edgecolor="black",
            linewidth=0.5,
        )
        ax.set_xticks(
            x,
            [m.removeprefix(MODEL_PREFIX) for m in r["method"]],
            rotation=45,
            ha="right",
            fontsize=8,
        )
        finite = mean[np.isfinite(mean)]
        low = float(np.nanmin(r["dice_ci_low"])) if finite.size else 0.0
        ax.set_ylim(max(0.0, min(low, finite.min() if finite.size else 0) - 0.05), 1.0)
        ax.set_ylabel("Dice (mean, 95% CI)")
        ax.set_title(f"{title or ''} {split}".strip() if len(splits) > 1 else (title or split))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dice_boxes(
    per_image: pd.DataFrame,
    path: str | Path,
    title: str | None = None,
    order: Sequence[str] | None = None,
) -> Path:
    """Distribution of per-image Dice per method (all splits in `per_image` pooled)."""
    methods = list(order or dict.fromkeys(per_image["method"]))
    data = [per_image.loc[per_image["method"] == m, "dice"].dropna().to_numpy() for m in methods]
    fig = Figure(figsize=(max(6.0, 0.45 * len(methods) + 2), 4))
    ax = fig.add_subplot()
    box = ax.boxplot(data, patch_artist=True, showfliers=True, widths=0.6)
    for patch, m in zip(box["boxes"], methods, strict=True):
        patch.set_facecolor(_color(m))
    ax.set_xticks(
        np.arange(1, len(methods) + 1),
        [m.removeprefix(MODEL_PREFIX) for m in methods],
        rotation=45,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("per-image Dice")
    ax.set_title(title or "per-image Dice")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _contour(ax: Any, mask: np.ndarray, color: str, width: float = 1.2) -> None:
    """Boundaries between label values (one level per label, so Th8..Th11 stay apart)."""
    top = int(mask.max()) if mask.size else 0
    if top > 0:
        ax.contour(mask, levels=np.arange(0.5, top + 0.5), colors=color, linewidths=width)


def plot_overlay_gallery(
    cases: Sequence[dict[str, Any]], path: str | Path, title: str | None = None
) -> Path:
    """One row per case: film + truth contour, film + prediction contour, disagreement map.

    A case is a dict with `image` (H,W or None), `truth`, `pred` (H,W labels),
    `disagreement` (H,W in [0,1]), `id`, `dice` and optionally `rule`."""
    rows = max(1, len(cases))
    fig = Figure(figsize=(9, 3 * rows), layout="constrained")
    if not cases:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no cases", ha="center", va="center")
        ax.axis("off")
        return save_figure(fig, path)
    for r, case in enumerate(cases):
        truth = np.asarray(case["truth"])
        film = case.get("image")
        film = np.zeros(truth.shape, dtype=np.uint8) if film is None else np.asarray(film)
        axes = [fig.add_subplot(rows, 3, 3 * r + c + 1) for c in range(3)]
        for ax in axes[:2]:
            ax.imshow(film, cmap="gray", vmin=0, vmax=255)
        _contour(axes[0], truth, "lime")
        _contour(axes[1], truth, "lime", 0.6)
        _contour(axes[1], np.asarray(case["pred"]), "red")
        shown = axes[2].imshow(np.asarray(case["disagreement"]), cmap="magma", vmin=0, vmax=1)
        fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
        axes[0].set_title(f"{case['id']}: truth", fontsize=8)
        axes[1].set_title(f"{case.get('rule', 'soft')} vote, Dice {case['dice']:.3f}", fontsize=8)
        axes[2].set_title("model disagreement", fontsize=8)
        for ax in axes:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_reliability(
    curves: dict[str, dict[str, Any]], path: str | Path, title: str | None = None
) -> Path:
    """Reliability diagrams (mean confidence against observed frequency per bin) before
    and after temperature scaling, one line per model or rule; the diagonal is perfect."""
    fig = Figure(figsize=(9.0, 4.2))
    for i, (key, label) in enumerate((("curve", "before"), ("curve_calibrated", "after")), 1):
        ax = fig.add_subplot(1, 2, i)
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle=":")
        for name, c in curves.items():
            conf = np.asarray(c[key]["confidence"], dtype=float)
            acc = np.asarray(c[key]["accuracy"], dtype=float)
            ok = np.isfinite(conf) & np.isfinite(acc)
            ece = c["ece" if key == "curve" else "ece_calibrated"]
            ax.plot(conf[ok], acc[ok], marker="o", markersize=3, linewidth=1,
                    label=f"{name} (ECE {ece:.3f})")  # fmt: skip
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{title + ': ' if title else ''}{label} temperature scaling", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)
