"""Statistics over per-image metric values: mean, SD, bootstrap CI, paired Wilcoxon test and
the paper's relative improvement.

Images are the unit of resampling (each image's metric is one observation), so the CI is
about the mean over images of the test set. NaNs (e.g. a metric that could not be computed)
are dropped and counted, never silently averaged in.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _sps

__all__ = [
    "bootstrap_ci",
    "paired_difference",
    "paired_wilcoxon",
    "proportion_ci",
    "relative_improvement_pct",
    "summarize",
]

# Cap on resampled values held at once (n_boot x n), so large test sets do not blow memory.
_MAX_BLOCK = 4_000_000


def _finite_1d(values: object) -> tuple[np.ndarray, int]:
    """Flattened float64 values without NaNs, and how many NaNs were dropped."""
    x = np.asarray(values, dtype=np.float64).ravel()
    nan = np.isnan(x)
    return x[~nan], int(nan.sum())


def _bootstrap(x: np.ndarray, n_boot: int, alpha: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of clean (NaN-free) values, vectorised in blocks."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = x.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_BLOCK // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, block):
        stop = min(start + block, n_boot)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    values: object, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """(low, high) percentile-bootstrap CI of the mean over images; NaNs are ignored,
    one value gives (v, v), none gives (nan, nan). Deterministic for a given seed."""
    x, _ = _finite_1d(values)
    return _bootstrap(x, n_boot, alpha, seed)


def summarize(
    values: object, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict[str, float | int]:
    """mean, sd (ddof=1; 0 for one value), bootstrap ci_low/ci_high, n (non-NaN values) and
    n_nan (NaNs ignored). With no values every statistic is nan."""
    x, n_nan = _finite_1d(values)
    n = int(x.size)
    low, high = _bootstrap(x, n_boot, alpha, seed)
    return {
        "mean": float(x.mean()) if n else math.nan,
        "sd": float(x.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan),
        "ci_low": low,
        "ci_high": high,
        "n": n,
        "n_nan": n_nan,
    }


def paired_difference(
    a: object, b: object, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict[str, float | int]:
    """The mean per-image difference a - b and its percentile-bootstrap CI, resampling
    images (so each keeps its pair): whether a method's gain over another is more than the
    spread of the films. Pairs with a NaN on either side are left out."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"paired values need equal lengths, got {x.size} and {y.size}")
    d, _ = _finite_1d(x - y)
    low, high = _bootstrap(d, n_boot, alpha, seed)
    return {"mean": float(d.mean()) if d.size else math.nan, "ci_low": low, "ci_high": high,
            "n": int(d.size)}  # fmt: skip


def paired_wilcoxon(a: object, b: object) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired per-image values (scipy defaults).

    Pairs with a NaN on either side are dropped. All differences zero -> 1.0 (no evidence of
    a difference; scipy would fail); fewer than 2 pairs -> nan (no test possible)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.nan
    if np.all(x == y):
        return 1.0
    return float(_sps.wilcoxon(x, y, alternative="two-sided").pvalue)


def relative_improvement_pct(value: float, reference: float) -> float:
    """100 * (value - reference) / reference, as the paper reports gains over the best single
    model; nan when reference is 0 (undefined)."""
    if reference == 0:
        return math.nan
    return 100.0 * (float(value) - float(reference)) / float(reference)


def proportion_ci(values: object, alpha: float = 0.05) -> dict[str, float | int]:
    """Rate of 0/1 per-image flags (NaNs ignored) with its Wilson score interval.

    Wilson rather than the bootstrap: a rate of 0 of 37 films is not certainly 0, and the
    percentile bootstrap would say [0, 0]."""
    x, _ = _finite_1d(values)
    n = int(x.size)
    if n == 0:
        return {"rate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    p = float(x.mean())
    z = float(_sps.norm.ppf(1 - alpha / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {
        "rate": p,
        "ci_low": max(0.0, centre - half),
        "ci_high": min(1.0, centre + half),
        "n": n,
    }
