"""The compact rules table the README quotes, regenerated from a run's `results.csv`, so no
figure in the documentation is typed by hand:

    python -m spineseg.report.readme_table outputs/demo/default [--splits test,external]
        [--methods best_single,soft,...] [--levels] [--hd95] [--paired]

(or a `film_scores/<split>` folder of `spineseg-score`, scored at the films' resolution).

One row per method: Dice mean ± sd [95% CI] per split, the relative change over the best
single model and the paired Wilcoxon p; `--levels` adds the level-error rate [95% CI],
`--hd95` the mean HD95, `--paired` the paired Dice difference against the best single model
with its bootstrap 95% CI.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from spineseg.names import BEST, ENSEMBLE_DIR, MODEL_PREFIX
from spineseg.report.tables import level_text, paired_text


def _dice(r: pd.Series) -> str:
    return (
        f"{r['dice_mean']:.3f} ± {r['dice_sd']:.3f} [{r['dice_ci_low']:.3f}, "
        f"{r['dice_ci_high']:.3f}]"
    )


def _p(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.2g}" if value < 0.01 else f"{value:.2f}"


def _check(results: pd.DataFrame, splits: list[str], methods: list[str], paired: bool) -> None:
    """What the table quotes is there: each split, each method in it, the paired columns."""
    for split in splits:
        if split not in set(results["split"]):
            there = ", ".join(dict.fromkeys(results["split"]))
            raise ValueError(f"no {split!r} split; there: {there}")
        there = list(results.loc[results["split"] == split, "method"])
        missing = [m for m in methods if m not in there]
        if missing:
            raise ValueError(f"no {missing[0]!r} in the {split} split; there: {', '.join(there)}")
    if paired and "dice_diff_vs_best" not in results.columns:
        raise ValueError("results.csv predates the paired difference: re-run spineseg-ensemble")


def readme_table(
    results: pd.DataFrame,
    splits: list[str] | None = None,
    methods: list[str] | None = None,
    levels: bool = False,
    hd95: bool = False,
    paired: bool = False,
) -> str:
    splits = splits or list(dict.fromkeys(results["split"]))
    if methods is None:
        methods = [m for m in dict.fromkeys(results["method"]) if not m.startswith(MODEL_PREFIX)]
    _check(results, splits, methods, paired)
    head, rule = ["method"], ["---"]
    for split in splits:
        n = int(results.loc[results["split"] == split, "n"].iloc[0])
        head += [f"{split} Dice (n={n})", "vs best", "p"]
        rule += ["---", "---:", "---:"]
        if paired:
            head.append(f"{split} paired Δ Dice [95% CI]")
            rule.append("---:")
        if hd95:
            unit = results.loc[results["split"] == split, "distance_unit"].iloc[0]
            head.append(f"{split} HD95 ({unit})")
            rule.append("---:")
        if levels:
            head.append(f"{split} level errors")
            rule.append("---:")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    table = results.set_index(["split", "method"])
    for method in methods:
        cells = [method.replace("_", " ")]
        for split in splits:
            r = table.loc[(split, method)]
            best = method == BEST
            cells += [
                _dice(r),
                "" if best else f"{r['rel_improvement_pct']:+.2f}%",
                "" if best else _p(float(r["p_value_vs_best_single"])),
            ]
            if paired:
                cells.append(
                    paired_text(
                        method,
                        r["dice_diff_vs_best"],
                        r["dice_diff_ci_low"],
                        r["dice_diff_ci_high"],
                    )
                )
            if hd95:
                cells.append(f"{r['hd95_mean']:.1f}")
            if levels:
                cells.append(
                    level_text(
                        r["level_error_rate"], r["level_error_ci_low"], r["level_error_ci_high"]
                    )
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_path(where: Path) -> Path:
    """A run's `ensemble/results.csv`, or the results.csv of a folder that holds one (a
    `film_scores/<split>/` set), or that file itself."""
    if where.is_file() or (where / "results.csv").is_file():
        return where if where.is_file() else where / "results.csv"
    return where / ENSEMBLE_DIR / "results.csv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--splits", default=None, help="comma-separated, default: all in the run")
    ap.add_argument("--methods", default=None, help="comma-separated, default: every rule")
    ap.add_argument("--levels", action="store_true", help="add the level-error rates")
    ap.add_argument("--hd95", action="store_true", help="add the mean HD95")
    ap.add_argument("--paired", action="store_true", help="add the paired Dice difference")
    args = ap.parse_args(argv)
    path = results_path(args.run_dir)
    if not path.is_file():
        print(f"error: {path} does not exist: run spineseg-ensemble first", file=sys.stderr)
        return 1
    results = pd.read_csv(path)
    split = lambda s: None if s is None else s.split(",")  # noqa: E731
    try:
        text = readme_table(
            results, split(args.splits), split(args.methods), args.levels, args.hd95, args.paired
        )
    except ValueError as err:
        print(f"error: {path}: {err}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
