"""The ensemble's files: what `evaluate.compute` found, written into one output set.

`<run_dir>/ensemble/` holds selection.json, calibration.json, quality.json, results.csv /
.md / .json, per_image.csv and figures/; `evaluate.run_ensemble` writes them into a staged
folder that replaces the old set whole. W&B gets the same tables and figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from spineseg.ensemble import scoring, voting
from spineseg.ensemble.evaluate import EnsembleSpec, EnsembleSummary, method_order
from spineseg.ensemble.quality import POOR_DICE
from spineseg.ensemble.selection import save_selection
from spineseg.ensemble.store import Truth, load_chunk, read_rows
from spineseg.names import CALIBRATION, QUALITY, SELECTION, model_method
from spineseg.report.tables import results_markdown
from spineseg.utils.io import atomic_write_json, atomic_write_text

__all__ = ["gallery_cases", "json_safe", "write_results", "write_set"]


def json_safe(value: Any) -> Any:
    """NaN and inf as null, numpy scalars as Python numbers: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_set(out_dir: Path, s: EnsembleSummary) -> None:
    """Every file of one ensemble set, then W&B when enabled."""
    save_selection(s.selection, out_dir / Path(SELECTION).name, s.set_id)
    atomic_write_json(
        out_dir / Path(CALIBRATION).name,
        json_safe({"temperatures": s.temperatures, "splits": s.calibrated}),
    )
    atomic_write_json(
        out_dir / Path(QUALITY).name,
        json_safe({"limits": {r: lim.to_json() for r, lim in s.limits.items()},
                   "detection": s.flags_caught, "poor_dice": POOR_DICE}),
    )  # fmt: skip
    extra = {
        "run_dir": str(s.run_dir),
        "set_id": s.set_id,
        "distance_unit": s.units,
        "n_images": s.n_images,
        "selection": s.selection.to_json(),
        "config": s.opts,
        "quality": s.flags_caught,
        "calibration": {
            split: {
                n: {k: v for k, v in c.items() if not k.startswith("curve")}
                for n, c in names.items()
            }
            for split, names in s.calibrated.items()
        },
    }
    write_results(out_dir, s.results, s.per_image, extra)
    figures, galleries = write_figures(out_dir / "figures", s) if s.opts["figures"] else ({}, {})
    if s.opts["wandb"]["enabled"]:
        from spineseg.report.wandb_log import log_results

        log_results(
            s.run_dir, s.opts["wandb"], s.results, s.per_image, figures, galleries,
            s.selection.to_json(),
        )  # fmt: skip


def write_results(
    out_dir: Path,
    results: pd.DataFrame,
    per_image: pd.DataFrame,
    extra: dict[str, Any],
) -> dict[str, Path]:
    """results.csv / .md / .json and per_image.csv, each written atomically."""
    paths = {
        "results_csv": out_dir / "results.csv",
        "results_md": out_dir / "results.md",
        "results_json": out_dir / "results.json",
        "per_image_csv": out_dir / "per_image.csv",
    }
    atomic_write_text(paths["per_image_csv"], per_image.to_csv(index=False))
    atomic_write_text(paths["results_csv"], results.to_csv(index=False))
    atomic_write_text(paths["results_md"], results_markdown(results, extra.get("n_images")))
    payload = {**extra, "results": results.to_dict(orient="records")}
    atomic_write_json(paths["results_json"], json_safe(payload))
    return paths


def write_figures(folder: Path, s: EnsembleSummary) -> tuple[dict[str, Path], dict[str, Path]]:
    """Reliability curves, Dice bars and boxes per split, and the best/worst gallery."""
    from spineseg.report import figures as fig

    spec = s.spec
    figures: dict[str, Path] = {}
    galleries: dict[str, Path] = {}
    shown = [r for r in ("soft", spec.rules[0]) if r in spec.rules][:1]
    shown += [model_method(spec.best_single)]
    for split, names in s.calibrated.items():
        figures[f"reliability_{split}"] = fig.plot_reliability(
            {n: names[n] for n in shown if n in names},
            folder / f"reliability_{split}.png",
            title=split,
        )
    for split, data in s.evaluated.items():
        sub_r = s.results[s.results["split"] == split]
        sub_p = s.per_image[s.per_image["split"] == split]
        figures[f"dice_bars_{split}"] = fig.plot_dice_bars(
            sub_r, folder / f"dice_bars_{split}.png", title=split
        )
        figures[f"dice_box_{split}"] = fig.plot_dice_boxes(
            sub_p,
            folder / f"dice_box_{split}.png",
            title=split,
            order=method_order(list(dict.fromkeys(sub_p["method"])), spec.rules),
        )
        if int(s.opts["gallery_n"]) > 0:
            cases = gallery_cases(
                split,
                [data.probs[m] for m in spec.models],
                data.truth,
                spec,
                s.per_image,
                int(s.opts["gallery_n"]),
            )
            galleries[f"gallery_{split}"] = fig.plot_overlay_gallery(
                cases, folder / f"gallery_{split}.png", title=split
            )
    return figures, galleries


def gallery_cases(
    split: str,
    probs: Sequence[np.ndarray],
    truth: Truth,
    spec: EnsembleSpec,
    per_image: pd.DataFrame,
    n: int,
) -> list[dict[str, Any]]:
    """The n best and n worst images by soft-vote Dice, with film, truth, soft-vote labels
    and the models' disagreement map, for the overlay gallery."""
    rule = "soft" if "soft" in spec.rules else spec.rules[0]
    scored = per_image[(per_image["split"] == split) & (per_image["method"] == rule)]
    scored = scored.sort_values("dice", kind="stable")
    picks = list(dict.fromkeys([*scored["id"].iloc[::-1][:n], *scored["id"].iloc[:n]]))
    if not picks:
        return []
    where = {i: k for k, i in enumerate(truth.ids.tolist())}
    index = np.array([where[i] for i in picks])
    raw = np.stack([read_rows(p, index) for p in probs])
    method = scoring.Method(rule, spec.thresholds.get(rule, spec.threshold), rule=rule)
    weights = torch.tensor(spec.weights, dtype=torch.float32)
    fused = scoring.score_chunk(
        raw, read_rows(truth.masks, index), [method], weights,
        models=spec.models, split=split, ids=truth.ids[index], want_labels=True,
    )  # fmt: skip
    labels = fused[rule].labels.astype(np.uint8)
    chunk = torch.from_numpy(load_chunk(probs, spec.models, split, truth.ids, index))
    disagree = voting.disagreement(chunk, spec.threshold).numpy()
    dice = scored.set_index("id")["dice"]
    cases = []
    for j, image_id in enumerate(picks):
        cases.append(
            {
                "id": image_id,
                "dice": float(dice[image_id]),
                "image": None if truth.images is None else np.asarray(truth.images[index[j]]),
                "truth": np.asarray(truth.masks[index[j]]),
                "pred": labels[j],
                "disagreement": disagree[j],
                "rule": rule,
            }
        )
    return cases
