"""Which models enter the ensemble, with which weights and thresholds: decided on `val` only.

Choosing models (or thresholds) on the test split would leak it into the reported result, so
every function here takes a `ValidationView`, which can open the `val` split and nothing
else. Selection is top-k by mean per-image validation Dice, or Caruana et al. (2004) greedy
forward selection with replacement, where multiplicities become the weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spineseg import config
from spineseg.ensemble.scoring import Method, score_chunk
from spineseg.ensemble.store import PredictionStore, SplitData, iter_raw_chunks, read_rows
from spineseg.errors import ConfigError, StoreError
from spineseg.names import VAL
from spineseg.utils.io import atomic_write_json

log = logging.getLogger(__name__)

METHODS = ("top_k", "greedy")
_DEFAULTS = config.group("ensemble/default")
#: Threshold grid of `tune_threshold` (0.05..0.95).
GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


class ValidationView:
    """The store as selection sees it: the `val` split only.

    It keeps no reference to the store, just closures bound to the split "val", so code that
    receives a view has no handle by which to name test or external."""

    __slots__ = ("_manifest", "_models", "_open", "_splits_of")

    def __init__(self, store: PredictionStore, split: str = VAL, tta: str = "none") -> None:
        if split != VAL:
            raise ConfigError(f"selection uses the validation split only, not {split!r}")
        self._open = lambda models: store.open_split(models, VAL, tta)
        self._models = store.models
        self._splits_of = store.splits_of
        self._manifest = store.read_manifest

    @property
    def split(self) -> str:
        return VAL

    def open(self, models: Sequence[str]) -> SplitData:
        return self._open(list(models))

    def models(self) -> list[str]:
        """Complete models that have a validation split."""
        return [m for m in self._models("complete") if VAL in self._splits_of(m)]

    def manifest(self, model: str) -> dict[str, Any] | None:
        return self._manifest(model)


@dataclass
class Selection:
    """The chosen models (best first) and everything the evaluator needs from validation."""

    models: list[str]
    weights: list[float]  # aligned with `models`, sum 1
    scores: dict[str, float]  # validation Dice of every candidate
    thresholds: dict[str, float]  # per rule
    method: str
    k: int
    n_val: int
    best_single: str
    multiplicities: dict[str, int] | None = None
    greedy_trace: list[float] = field(default_factory=list)
    threshold_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    #: rule -> post-processing chosen on validation, and every candidate's val Dice
    postprocess: dict[str, str] = field(default_factory=dict)
    postprocess_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the test-time augmentation used (chosen on validation), and each variant's val Dice
    tta: str = "none"
    tta_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the threshold each model (and best_single) was scored at (`ensemble.threshold`)
    model_threshold: float = 0.5

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["weights"] = dict(zip(self.models, self.weights, strict=True))
        data["val_scores"] = {m: self.scores[m] for m in self.models}
        data["split"] = VAL
        return data


# ---------------------------------------------------------------------- scoring
def _chunk_dices(
    data: SplitData,
    models: Sequence[str],
    methods: Sequence[Method],
    weights: torch.Tensor | None,
    chunk_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """{method: per-image Dice} per chunk of the validation split (`scoring.score_chunk`)."""
    arrays = [data.probs[m] for m in models]
    for sl, raw in iter_raw_chunks(arrays, chunk_size):
        masks = read_rows(data.truth.masks, sl)
        scored = score_chunk(
            raw, masks, methods, weights, models=models, split=VAL, ids=data.truth.ids[sl]
        )
        yield {m.name: scored[m.name].overlap["dice"] for m in methods}


def _mean_dices(
    data: SplitData,
    models: Sequence[str],
    methods: Sequence[Method],
    weights: torch.Tensor | None,
    chunk_size: int,
) -> dict[str, float]:
    """{method: mean per-image validation Dice}, images with an undefined Dice left out."""
    totals = dict.fromkeys((m.name for m in methods), 0.0)
    counts = dict.fromkeys(totals, 0)
    for dice in _chunk_dices(data, models, methods, weights, chunk_size):
        for name, d in dice.items():
            totals[name] += float(np.nansum(d))
            counts[name] += int(np.isfinite(d).sum())
    return {n: totals[n] / counts[n] if counts[n] else float("nan") for n in totals}


def validation_scores(
    view: ValidationView, models: Sequence[str], threshold: float = 0.5, chunk_size: int = 16
) -> dict[str, float]:
    """Mean per-image validation Dice of each model, streamed chunk by chunk."""
    data = view.open(models)
    methods = [Method(m, threshold, model=k) for k, m in enumerate(models)]
    return _mean_dices(data, models, methods, None, chunk_size)


def rank(scores: dict[str, float]) -> list[str]:
    """Best first; NaN scores last; ties broken by name so runs are reproducible."""
    return sorted(scores, key=lambda m: (-np.nan_to_num(scores[m], nan=-np.inf), m))


def top_k(scores: dict[str, float], k: int) -> list[str]:
    if k < 1:
        raise ConfigError(f"ensemble.top_k must be >= 1, got {k}")
    if k > len(scores):
        warnings.warn(
            f"top_k={k} but only {len(scores)} successful model(s); using all of them",
            stacklevel=2,
        )
    return rank(scores)[:k]


def greedy_select(
    view: ValidationView,
    scores: dict[str, float],
    size: int,
    threshold: float = 0.5,
    chunk_size: int = 16,
) -> tuple[dict[str, int], list[float]]:
    """Caruana forward selection with replacement on validation soft-vote Dice.

    Starts from the best single model and adds, one pick at a time, the model (possibly one
    already in) that maximises the Dice of the multiset's mean probability; stops after
    `size` picks or when no pick improves. Returns multiplicities and the Dice trace."""
    if size < 1:
        raise ConfigError(f"ensemble.greedy_size must be >= 1, got {size}")
    library = rank(scores)
    data = view.open(library)
    counts = np.zeros(len(library), dtype=np.int64)
    counts[0] = 1
    trace = [scores[library[0]]]
    while counts.sum() < size:
        # Each candidate multiset's mean probability is a weighted vote, weights = counts.
        methods = [
            Method(str(j), threshold, rule="weighted", weights=tuple(map(float, counts + e)))
            for j, e in enumerate(np.eye(len(library), dtype=np.int64))
        ]
        dice = _mean_dices(data, library, methods, None, chunk_size)
        cand = np.nan_to_num(np.array([dice[m.name] for m in methods]), nan=-np.inf)
        j = int(np.argmax(cand))  # first maximum = the better-ranked model on ties
        if not cand[j] > trace[-1] + 1e-12:
            break
        counts[j] += 1
        trace.append(float(cand[j]))
    picked = {m: int(c) for m, c in zip(library, counts, strict=True) if c > 0}
    return picked, trace


def tune_thresholds(
    view: ValidationView,
    models: Sequence[str],
    weights: Sequence[float],
    rules: Sequence[str],
    default: float = 0.5,
    grid: Sequence[float] = GRID,
    chunk_size: int = 16,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each rule's foreground threshold maximising mean validation Dice over `grid`.

    Vertebrae mode labels by argmax, so there is nothing to tune and `default` is kept.
    Ties go to the value closest to `default`."""
    data = view.open(models)
    if data.channels > 1:
        log.info("vertebrae mode labels by argmax: no thresholds to tune")
        return {r: default for r in rules}, {}
    w = torch.tensor(list(weights), dtype=torch.float32)
    methods = [
        Method(f"{rule}@{g}", float(t), rule=rule) for rule in rules for g, t in enumerate(grid)
    ]
    dice = _mean_dices(data, models, methods, w, chunk_size)
    means = np.nan_to_num(
        np.array([[dice[f"{rule}@{g}"] for g in range(len(grid))] for rule in rules]),
        nan=-np.inf,
    )
    closeness = -np.abs(np.asarray(grid) - default)
    thresholds = {}
    for r, rule in enumerate(rules):
        best = max(range(len(grid)), key=lambda g, r=r: (means[r, g], closeness[g]))
        thresholds[rule] = float(grid[best])
    table = {
        rule: {f"{t:.2f}": float(means[r, g]) for g, t in enumerate(grid)}
        for r, rule in enumerate(rules)
    }
    return thresholds, table


# ---------------------------------------------------------------------- entry point
def select_models(
    view: ValidationView,
    candidates: Sequence[str] | None = None,
    *,
    k: int = _DEFAULTS["top_k"],
    method: str = _DEFAULTS["selection"],
    greedy_size: int = _DEFAULTS["greedy_size"],
    rules: Sequence[str] = tuple(_DEFAULTS["rules"]),
    threshold: float = _DEFAULTS["threshold"],
    tune_threshold: bool = _DEFAULTS["tune_threshold"],
    chunk_size: int = _DEFAULTS["chunk_size"],
) -> Selection:
    """Rank `candidates` (default: every complete model with val) on validation, choose
    the ensemble and its weights (normalised val Dice, or Caruana multiplicities). The
    defaults are the ensemble's (conf/ensemble/default.yaml)."""
    if method not in METHODS:
        raise ConfigError(
            f"unknown ensemble.selection {method!r}; valid choices: {', '.join(METHODS)}"
        )
    candidates = list(view.models() if candidates is None else candidates)
    if not candidates:
        raise StoreError("no complete model with a validation split to select from")
    scores = validation_scores(view, candidates, threshold, chunk_size)
    n_val = view.open(candidates[:1]).truth.n
    multiplicities = None
    trace: list[float] = []
    if method == "greedy":
        multiplicities, trace = greedy_select(view, scores, greedy_size, threshold, chunk_size)
        models = [m for m in rank(scores) if m in multiplicities]
        raw = np.array([multiplicities[m] for m in models], dtype=np.float64)
    else:
        models = top_k(scores, k)
        raw = np.array([max(scores[m], 0.0) for m in models], dtype=np.float64)
        raw = np.nan_to_num(raw)
    weights = raw / raw.sum() if raw.sum() > 0 else np.full(len(models), 1 / len(models))
    thresholds = {r: float(threshold) for r in rules}
    table: dict[str, dict[str, float]] = {}
    if tune_threshold:
        thresholds, table = tune_thresholds(
            view, models, weights, rules, threshold, chunk_size=chunk_size
        )
    log.info(
        "selected %d model(s) by %s on val (n=%d): %s",
        len(models),
        method,
        n_val,
        ", ".join(models),
    )
    return Selection(
        models=models,
        weights=[float(w) for w in weights],
        scores=scores,
        thresholds=thresholds,
        method=method,
        k=len(models),
        n_val=n_val,
        best_single=rank(scores)[0],
        multiplicities=multiplicities,
        greedy_trace=trace,
        threshold_scores=table,
        model_threshold=float(threshold),
    )


def save_selection(selection: Selection, path: str | Path, set_id: str | None = None) -> Path:
    """selection.json; `set_id` ties it to the results written with it (the report checks)."""
    path = Path(path)
    data = selection.to_json()
    if set_id is not None:
        data["set_id"] = set_id
    atomic_write_json(path, data)
    return path
