"""Per-film quality flags, computed without the truth, so a reader knows which results to
check by hand.

Four signs, each with a normal range set on validation only: the members' disagreement
(relative to the region's size), the region's area and its vertical position (against the
validation truth's), and the number of separate pieces. A film outside any range is flagged,
with the reasons; the flag score is its largest excess over a range (> 1 is flagged), so
its AUROC for poor results (Dice < 0.7) can be reported on test and external.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

FEATURES = ("disagreement", "area", "position", "components")
#: Validation quantiles that bound a normal film, and the Dice below which a result is poor.
LOW_Q, HIGH_Q, POOR_DICE = 0.025, 0.975, 0.7


def film_features(labels: np.ndarray, spread: np.ndarray) -> dict[str, float]:
    """One film's signs: labels (H,W) after the rule (and post-processing), spread (H,W)
    the members' disagreement in [0, 1]."""
    fg = np.asarray(labels) > 0
    n = int(fg.sum())
    return {
        "disagreement": float(np.asarray(spread, np.float64).sum() / max(n, 1)),
        "area": n / fg.size,
        "position": float(np.nonzero(fg)[0].mean() / fg.shape[0]) if n else float("nan"),
        "components": float(ndimage.label(fg)[1]) if n else 0.0,
    }


@dataclass(frozen=True)
class Limits:
    """Normal ranges, from validation: the truth's area and position, the prediction's
    disagreement, one piece."""

    disagreement: float
    area: tuple[float, float]
    position: tuple[float, float]
    components: float = 1.0
    n_val: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        return cls(
            float(data["disagreement"]),
            tuple(data["area"]),  # type: ignore[arg-type]
            tuple(data["position"]),  # type: ignore[arg-type]
            float(data.get("components", 1.0)),
            int(data.get("n_val", 0)),
        )


def fit_limits(
    predicted: Sequence[Mapping[str, float]], truth: Sequence[Mapping[str, float]]
) -> Limits:
    """Ranges from the validation films: `predicted` features of the ensemble's output,
    `truth` features of their masks (what a normal region looks like)."""

    def q(rows: Sequence[Mapping[str, float]], key: str, p: float) -> float:
        values = np.array([r[key] for r in rows], np.float64)
        values = values[np.isfinite(values)]
        return float(np.quantile(values, p)) if len(values) else float("nan")

    return Limits(
        disagreement=q(predicted, "disagreement", HIGH_Q),
        area=(q(truth, "area", LOW_Q), q(truth, "area", HIGH_Q)),
        position=(q(truth, "position", LOW_Q), q(truth, "position", HIGH_Q)),
        components=max(1.0, q(truth, "components", 1.0)),
        n_val=len(predicted),
    )


def _excess(value: float, low: float, high: float) -> float:
    """How far outside [low, high] a value lies, in units of the range's half-width (<= 1
    inside): 2 means one half-width beyond an edge."""
    if not np.isfinite(value):
        return np.inf
    centre, half = (low + high) / 2, max((high - low) / 2, 1e-12)
    return abs(value - centre) / half


def flag(features: Mapping[str, float], limits: Limits) -> tuple[float, list[str]]:
    """(score, reasons): the largest excess over a normal range (> 1: flagged) and what is
    out of range. An empty prediction is flagged for its area and position."""
    scores = {
        "disagreement": features["disagreement"] / max(limits.disagreement, 1e-12),
        "area": _excess(features["area"], *limits.area),
        "position": _excess(features["position"], *limits.position),
        "components": features["components"] / limits.components,
    }
    reasons = {
        "disagreement": "members disagree",
        "area": "unusual area" if features["area"] > 0 else "nothing found",
        "position": "unusual position",
        "components": "several pieces",
    }
    out = [reasons[k] for k in FEATURES if scores[k] > 1]
    score = max(scores.values())
    return (float(score) if np.isfinite(score) else 1e6), out


def detection(scores: Sequence[float], dice: Sequence[float]) -> dict[str, float]:
    """How well flags (score > 1) catch poor results (Dice < POOR_DICE): sensitivity,
    specificity and the AUROC of the score (NaN where a class is missing)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    s = np.asarray(scores, np.float64)
    poor = np.asarray(dice, np.float64) < POOR_DICE
    flagged = s > 1
    n_poor, n_ok = int(poor.sum()), int((~poor).sum())
    sens = float((flagged & poor).sum() / n_poor) if n_poor else float("nan")
    spec = float((~flagged & ~poor).sum() / n_ok) if n_ok else float("nan")
    auroc = (
        float(binary_auroc(torch.from_numpy(np.minimum(s, 1e6)), torch.from_numpy(poor).long()))
        if n_poor and n_ok
        else float("nan")
    )
    return {
        "n": len(s),
        "n_poor": n_poor,
        "n_flagged": int(flagged.sum()),
        "sensitivity": sens,
        "specificity": spec,
        "auroc": auroc,
    }


# ---------------------------------------------------------------------- over a stored split
def rule_features(
    data: Any, spec: Any, post: Mapping[str, str], chunk_size: int = 16
) -> dict[str, list[dict[str, float]]]:
    """Every rule's per-film features on a stored split (`SplitData`), after the
    post-processing validation chose for the rule, as predict will see them."""
    import torch

    from spineseg.ensemble import postprocess, rules, voting
    from spineseg.ensemble.store import iter_chunks, load_chunk

    arrays = [data.probs[m] for m in spec.models]
    weights = torch.tensor(spec.weights, dtype=torch.float32)
    out: dict[str, list[dict[str, float]]] = {r: [] for r in spec.rules}
    for sl in iter_chunks(data.truth.n, chunk_size):
        chunk = torch.from_numpy(load_chunk(arrays, spec.models, data.split, data.truth.ids, sl))
        spread = voting.disagreement(chunk, spec.threshold).numpy()
        for rule in spec.rules:
            t = spec.thresholds.get(rule, spec.threshold)
            labels = rules.fuse_labels(rule, chunk, weights, threshold=t).numpy()
            labels = postprocess.apply(post.get(rule, "none"), labels)
            out[rule] += [film_features(lab, s) for lab, s in zip(labels, spread, strict=True)]
    return out


def truth_features(truth: Any) -> list[dict[str, float]]:
    """The features of the true masks (what a normal region looks like)."""
    blank = np.zeros(truth.masks.shape[1:], np.float32)
    return [film_features(np.asarray(m), blank) for m in truth.masks]


def method_of(rule: str, post: Mapping[str, str]) -> str:
    """The results' name of a rule with the post-processing chosen for it."""
    from spineseg.names import post_method

    return post_method(rule, post.get(rule, "none"))


def assess(
    val: Any,
    splits: Mapping[str, Any],
    spec: Any,
    post: Mapping[str, str],
    per_image: Any,
    chunk_size: int = 16,
) -> tuple[dict[str, Limits], dict[str, dict[str, dict[str, float]]], list[dict[str, Any]]]:
    """Limits per rule from `val`; on every other split, each film's flag and how well the
    flags catch poor results. Returns (limits, detection[rule][split], per-film rows)."""
    normal = truth_features(val.truth)
    limits = {
        rule: fit_limits(pred, normal)
        for rule, pred in rule_features(val, spec, post, chunk_size).items()
    }
    detection_table: dict[str, dict[str, dict[str, float]]] = {r: {} for r in spec.rules}
    rows: list[dict[str, Any]] = []
    for split, data in splits.items():
        feats = rule_features(data, spec, post, chunk_size)
        for rule, films in feats.items():
            method = method_of(rule, post)
            dice = per_image[(per_image["split"] == split) & (per_image["method"] == method)]
            dice = dice.set_index("id")["dice"]
            scores = []
            for image_id, f in zip(data.truth.ids.tolist(), films, strict=True):
                score, reasons = flag(f, limits[rule])
                scores.append(score)
                rows.append({"split": split, "method": method, "id": image_id,
                             "flag_score": score, "flag": "; ".join(reasons)})  # fmt: skip
            ids = data.truth.ids.tolist()
            detection_table[rule][split] = detection(scores, [float(dice[i]) for i in ids])
    return limits, detection_table, rows
