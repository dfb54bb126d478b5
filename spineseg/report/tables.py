"""The results as tables: one formatting of the rules table for results.md, the report and
the console, so every place shows the same columns under the same headers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from spineseg.names import BEST, MODEL_PREFIX

#: The columns printed to the console (the CSV has them all).
SUMMARY_COLUMNS = [
    "split",
    "method",
    "k",
    "dice_mean",
    "dice_ci_low",
    "dice_ci_high",
    "hd95_mean",
    "level_error_rate",
    "rel_improvement_pct",
    "dice_diff_ci_low",
    "dice_diff_ci_high",
    "p_value_vs_best_single",
]


def num(value: Any) -> float:
    """A table cell as a float; None, text and missing values are NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fmt(value: Any, digits: int = 4) -> str:
    v = num(value)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def mean_sd(mean: Any, sd: Any) -> str:
    if not math.isfinite(num(mean)):
        return "n/a"
    return f"{fmt(mean)} ± {fmt(sd)}" if math.isfinite(num(sd)) else fmt(mean)


def level_text(rate: float, low: float, high: float) -> str:
    """A level-error rate as `12.5% [6.1, 23.8]`, n/a where the truth has no vertebrae."""
    if rate is None or not math.isfinite(num(rate)):
        return "n/a"
    return f"{100 * rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def paired_text(method: str, diff: Any, low: Any, high: Any) -> str:
    """A method's paired Dice difference against the best single model, `+0.010 [-0.004,
    +0.024]`; blank on the best single model's own row."""
    if method == BEST:
        return ""
    if not math.isfinite(num(diff)):
        return "n/a"
    return f"{num(diff):+.3f} [{num(low):+.3f}, {num(high):+.3f}]"


def console_table(results: pd.DataFrame) -> str:
    """The summary the ensemble prints: the main columns, 4 decimals."""
    return results[SUMMARY_COLUMNS].to_markdown(index=False, floatfmt=".4f")


def rule_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The voting rules and the best single model (not the individual selected models)."""
    return results[~results["method"].astype(str).str.startswith(MODEL_PREFIX)]


def rules_table(
    results: pd.DataFrame, unit: str | None = None, models: bool = False
) -> pd.DataFrame:
    """Rules x split with Dice mean ± sd [95% CI], IoU, precision, recall, HD95/ASSD in
    `unit`, level errors, relative improvement over the best single model, the paired Dice
    difference with its CI and Wilcoxon p;
    with `models`, each selected model's own row too."""
    r = results if models else rule_rows(results)
    units = r["distance_unit"] if "distance_unit" in r else pd.Series(["px"] * len(r))
    unit = unit or "/".join(dict.fromkeys(units.astype(str)))
    return pd.DataFrame(
        {
            "split": r["split"],
            "method": r["method"],
            "k": r["k"],
            "n": r["n"],
            "Dice mean ± sd [95% CI]": [
                f"{mean_sd(m, s)} [{fmt(lo)}, {fmt(hi)}]"
                for m, s, lo, hi in zip(
                    r["dice_mean"], r["dice_sd"], r["dice_ci_low"], r["dice_ci_high"], strict=True
                )
            ],
            "IoU": [mean_sd(m, s) for m, s in zip(r["iou_mean"], r["iou_sd"], strict=True)],
            "precision": [fmt(v) for v in r["precision_mean"]],
            "recall": [fmt(v) for v in r["recall_mean"]],
            f"HD95 ({unit})": [
                mean_sd(m, s) for m, s in zip(r["hd95_mean"], r["hd95_sd"], strict=True)
            ],
            f"ASSD ({unit})": [
                mean_sd(m, s) for m, s in zip(r["assd_mean"], r["assd_sd"], strict=True)
            ],
            "level errors [95% CI]": [
                level_text(*v)
                for v in r.reindex(
                    columns=["level_error_rate", "level_error_ci_low", "level_error_ci_high"]
                ).itertuples(index=False)
            ],
            "Δ Dice vs best single (%)": [
                "n/a" if not math.isfinite(num(v)) else f"{num(v):+.2f}"
                for v in r["rel_improvement_pct"]
            ],
            "paired Δ Dice [95% CI]": [
                paired_text(*v)
                for v in r.reindex(
                    columns=["method", "dice_diff_vs_best", "dice_diff_ci_low", "dice_diff_ci_high"]
                ).itertuples(index=False)
            ],
            "p (Wilcoxon)": [
                "" if not math.isfinite(num(p)) else f"{num(p):.3g}"
                for p in r["p_value_vs_best_single"]
            ],
        }
    ).reset_index(drop=True)


def results_markdown(results: pd.DataFrame, n_images: Mapping[str, int] | None = None) -> str:
    """results.md: one table per split, every rule and every selected model."""
    parts = []
    for split in dict.fromkeys(results["split"]):
        part = results[results["split"] == split]
        table = rules_table(part, models=True).drop(columns=["split"])
        n = (n_images or {}).get(split, int(part["n"].iloc[0]))
        parts.append(
            f"## {split} (n = {n})\n\n{table.to_markdown(index=False, disable_numparse=True)}\n"
        )
    return "# Ensemble results\n\n" + "\n".join(parts)
