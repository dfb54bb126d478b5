"""The ensemble's computation: choose on validation, then score every voting rule, every
selected model and the best single model per image in one streaming pass over the held-out
splits, with the statistics, the temperatures and the quality limits (`compute` returns an
`EnsembleSummary`; `spineseg.report.outputs` writes it).

Images are read in chunks from the store's memory maps, so peak memory depends on
`chunk_size` and K, not on N. The chunk evaluation takes plain arrays, which is what lets the
Lightning callback score in-memory predictions with the same code.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from spineseg import config
from spineseg.checks import check_numbers
from spineseg.ensemble import (
    calibration,
    metrics,
    postprocess,
    quality,
    rules,
    scoring,
    stats,
    tta,
)
from spineseg.ensemble.selection import (
    Selection,
    ValidationView,
    select_models,
)
from spineseg.ensemble.store import (
    PredictionStore,
    SplitData,
    iter_raw_chunks,
    read_rows,
)
from spineseg.errors import ConfigError, StoreError, choices_message
from spineseg.names import BEST, ENSEMBLE_DIR, POST_SEP, VAL, model_method, post_method
from spineseg.names import STORED_SPLITS as SPLITS
from spineseg.utils.io import staged_dir
from spineseg.utils.paths import not_a_run

log = logging.getLogger(__name__)

METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd")
PER_IMAGE_COLUMNS = ("split", "method", "id", *METRICS, *metrics.LEVEL_KEYS)
RESULT_COLUMNS = (
    "split", "method", "k", "n", "threshold",
    "dice_mean", "dice_sd", "dice_ci_low", "dice_ci_high",
    "iou_mean", "iou_sd", "precision_mean", "recall_mean",
    "hd95_mean", "hd95_sd", "hd95_n_nan", "assd_mean", "assd_sd",
    "level_error_rate", "level_error_ci_low", "level_error_ci_high", "level_n",
    "level_offset_abs_mean", "four_in_order_rate",
    "rel_improvement_pct", "dice_diff_vs_best", "dice_diff_ci_low", "dice_diff_ci_high",
    "p_value_vs_best_single", "distance_unit",
    "temperature", "ece", "ece_calibrated",
)  # fmt: skip

#: The ensemble's options and their defaults: conf/ensemble/default.yaml, the one source.
DEFAULTS: dict[str, Any] = config.group("ensemble/default")


# ---------------------------------------------------------------------- configuration
def ensemble_config(cfg: Any = None) -> dict[str, Any]:
    """`cfg` (dict, DictConfig or None) over `DEFAULTS`, validated: a typo is an error, not a
    silently ignored option."""
    if cfg is None:
        given: dict[str, Any] = {}
    elif isinstance(cfg, Mapping) and not hasattr(cfg, "_metadata"):
        given = copy.deepcopy(dict(cfg))
    else:
        from omegaconf import OmegaConf

        given = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    out = copy.deepcopy(DEFAULTS)
    for key, value in given.items():
        if key not in DEFAULTS:
            raise ConfigError(choices_message("ensemble option", key, list(DEFAULTS)))
        if key == "wandb":
            extra = set(value or {}) - set(DEFAULTS["wandb"])
            if extra:
                raise ConfigError(
                    choices_message(
                        "ensemble.wandb option", sorted(extra)[0], list(DEFAULTS["wandb"])
                    )
                )
            out["wandb"].update(value or {})
        else:
            out[key] = value
    out["rules"] = list(out["rules"])
    for rule in out["rules"]:
        rules.get(rule)
    out["postprocess"] = postprocess.check_names([p for p in out["postprocess"] if p != "none"])
    if out["tta"] not in (VAL, *tta.VARIANTS):  # val: the variant validation scores best
        raise ConfigError(choices_message("ensemble.tta", out["tta"], [VAL, *tta.VARIANTS]))
    out["splits"] = list(out["splits"])
    for split in out["splits"]:
        if split not in SPLITS:
            raise ConfigError(choices_message("split", split, list(SPLITS)))
    if not 0.0 < float(out["threshold"]) < 1.0:
        raise ConfigError(f"ensemble.threshold must be in (0, 1), got {out['threshold']}")
    check_numbers(out, prefix="ensemble.")
    return out


@dataclass(frozen=True)
class EnsembleSpec:
    """What the evaluator needs from selection; the callback builds one without a store."""

    models: list[str]
    weights: list[float]
    rules: list[str]
    thresholds: dict[str, float]
    best_single: str
    threshold: float = 0.5  # of the individual models

    @classmethod
    def from_selection(cls, sel: Selection, rules: Sequence[str], threshold: float) -> EnsembleSpec:
        return cls(
            list(sel.models),
            list(sel.weights),
            list(rules),
            {r: sel.thresholds.get(r, threshold) for r in rules},
            sel.best_single,
            threshold,
        )


# ---------------------------------------------------------------------- the one pass
def scored_methods(spec: EnsembleSpec) -> list[scoring.Method]:
    """Every rule at its threshold, then every model at the models' threshold."""
    return [
        *[scoring.Method(r, spec.thresholds.get(r, spec.threshold), rule=r) for r in spec.rules],
        *[
            scoring.Method(model_method(m), spec.threshold, model=k)
            for k, m in enumerate(spec.models)
        ],
    ]


def evaluate_arrays(
    split: str,
    probs: Sequence[np.ndarray],
    masks: np.ndarray,
    ids: np.ndarray,
    spec: EnsembleSpec,
    spacing: np.ndarray | None = None,
    chunk_size: int = 16,
    distances: bool = True,
    vertebrae: np.ndarray | None = None,
    post: Sequence[str] = (),
) -> pd.DataFrame:
    """Per-image metrics of every rule, every model and `best_single` on one split.

    `vertebrae` (N,H,W) Th8..Th11 as 1..4 gives the level metrics (`metrics.level_metrics`);
    without it they are NaN. Each post-processing in `post` adds every rule and the best
    single model once more, as `<method>+<name>`, scored on the post-processed labels.

    `probs` are K (N,C,H,W) arrays aligned with `spec.models` (memmaps or in memory); one
    chunk of them is read at a time, the next while the current one is scored
    (`scoring.score_chunk`)."""
    if len(probs) != len(spec.models):
        raise StoreError(
            f"split {split!r}: {len(probs)} probability arrays for {len(spec.models)} models"
        )
    ids = np.asarray(ids).astype(str)
    num_classes = max(2, int(probs[0].shape[1]))
    weights = torch.tensor(spec.weights, dtype=torch.float32)
    cols: dict[str, list[Any]] = {c: [] for c in PER_IMAGE_COLUMNS}
    best_name = model_method(spec.best_single)
    methods = scored_methods(spec)

    def add(
        method: str,
        overlap: Mapping[str, np.ndarray],
        labels: Any,
        truth: np.ndarray,
        sl: slice,
        sp: np.ndarray | None,
        axis: dict[str, np.ndarray] | None,
        post: str = "none",
    ) -> None:
        n = len(truth)
        if distances:
            sf = metrics.surface_metrics(labels, truth, num_classes, spacing=sp)
        else:
            sf = {"hd95": np.full(n, np.nan), "assd": np.full(n, np.nan)}
        if axis is not None:
            sf = {**sf, **metrics.level_metrics(labels, axis)}
        else:
            sf = {**sf, **{key: np.full(n, np.nan) for key in metrics.LEVEL_KEYS}}
        # The best model is listed again as best_single. A swept member's own name may hold
        # the separator (`unet_lite0+data.preprocess=clahe`), so names are built, not parsed.
        names = [post_method(method, post)]
        if method == best_name:
            names = [post_method(BEST, post)] if post != "none" else [method, BEST]
        for name in names:
            cols["split"].extend([split] * n)
            cols["method"].extend([name] * n)
            cols["id"].extend(ids[sl].tolist())
            for key in METRICS + metrics.LEVEL_KEYS:
                source = overlap if key in metrics.OVERLAP_KEYS else sf
                cols[key].extend(np.asarray(source[key], dtype=np.float64).tolist())

    post = list(post)
    want_labels = distances or vertebrae is not None or bool(post)
    post_of = {m.name for m in methods if m.rule is not None or m.name == best_name}

    def add_post(method: str, labels: Any, truth: np.ndarray, sl: slice, sp, axis) -> None:
        if method not in post_of:
            return
        for name in post:
            done = postprocess.apply(name, np.asarray(labels))
            overlap = metrics.overlap_metrics(done, truth, num_classes)
            add(method, overlap, done, truth, sl, sp, axis, post=name)

    for sl, raw in iter_raw_chunks(probs, chunk_size):
        truth = read_rows(masks, sl)
        sp = None if spacing is None else np.asarray(spacing[sl], dtype=np.float64)
        axis = None if vertebrae is None else metrics.spine_axis(read_rows(vertebrae, sl), sp)
        scored = scoring.score_chunk(
            raw, truth, methods, weights,
            models=spec.models, split=split, ids=ids[sl], want_labels=want_labels,
        )  # fmt: skip
        for m in methods:
            got = scored[m.name]
            add(m.name, got.overlap, got.labels, truth, sl, sp, axis)
            add_post(m.name, got.labels, truth, sl, sp, axis)
    df = pd.DataFrame(cols, columns=list(PER_IMAGE_COLUMNS))
    # Same table whatever the chunk size: methods in report order, images in store order.
    rank = {m: i for i, m in enumerate(method_order(list(dict.fromkeys(df["method"])), spec.rules))}
    position = {i: k for k, i in enumerate(ids.tolist())}
    key = df["method"].map(rank) * len(ids) + df["id"].map(position)
    return df.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def method_order(
    methods: Sequence[str], rules: Sequence[str] = tuple(DEFAULTS["rules"])
) -> list[str]:
    """best_single, then the rules (in config order), then their post-processed variants
    (`<method>+<name>`, same order), then the individual models."""
    head = [BEST, *[r for r in rules if r in methods]]
    rank = {m: i for i, m in enumerate(head)}
    post = sorted(
        (m for m in methods if m.partition(POST_SEP)[0] in rank and m not in rank),
        key=lambda m: (m.partition(POST_SEP)[2], rank[m.partition(POST_SEP)[0]]),
    )
    rest = [m for m in methods if m not in head and m not in post]
    return [m for m in head if m in methods] + list(dict.fromkeys(post + rest))


def summarize_results(
    per_image: pd.DataFrame,
    spec: EnsembleSpec,
    n_boot: int = 2000,
    seed: int = 0,
    distance_unit: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per (split, method): mean, sd and bootstrap CI of Dice, means of the rest,
    relative improvement, the paired Dice difference (bootstrap CI over images) and the
    paired Wilcoxon p against best_single."""
    rows = []
    for split in dict.fromkeys(per_image["split"]):
        part = per_image[per_image["split"] == split]
        best = part[part["method"] == BEST].set_index("id")["dice"]
        best_mean = float(best.mean()) if len(best) else math.nan
        for method in method_order(list(dict.fromkeys(part["method"])), spec.rules):
            g = part[part["method"] == method]
            base = method.partition(POST_SEP)[0]  # a rule's name never holds the separator
            dice = stats.summarize(g["dice"].to_numpy(), n_boot=n_boot, seed=seed)
            hd = g["hd95"].to_numpy()
            row: dict[str, Any] = {
                "split": split,
                "method": method,
                "k": len(spec.models) if base in spec.rules else 1,
                "n": len(g),
                "threshold": spec.thresholds.get(base, spec.threshold),
                "dice_mean": dice["mean"],
                "dice_sd": dice["sd"],
                "dice_ci_low": dice["ci_low"],
                "dice_ci_high": dice["ci_high"],
                "hd95_n_nan": int(np.sum(~np.isfinite(hd))),
                "distance_unit": (distance_unit or {}).get(split, "px"),
            }
            for key in ("iou", "precision", "recall", "hd95", "assd"):
                values = g[key].to_numpy(dtype=np.float64)
                finite = values[np.isfinite(values)]
                row[f"{key}_mean"] = float(finite.mean()) if finite.size else math.nan
                row[f"{key}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
            level = stats.proportion_ci(g["level_error"].to_numpy())
            row["level_error_rate"] = level["rate"]
            row["level_error_ci_low"], row["level_error_ci_high"] = (
                level["ci_low"],
                level["ci_high"],
            )
            row["level_n"] = level["n"]
            offsets = np.abs(g["level_offset"].to_numpy(dtype=np.float64))
            offsets = offsets[np.isfinite(offsets)]
            row["level_offset_abs_mean"] = float(offsets.mean()) if offsets.size else math.nan
            row["four_in_order_rate"] = stats.proportion_ci(g["four_in_order"].to_numpy())["rate"]
            if method == BEST:
                row["rel_improvement_pct"], row["p_value_vs_best_single"] = 0.0, math.nan
                row["dice_diff_vs_best"] = row["dice_diff_ci_low"] = row["dice_diff_ci_high"] = 0.0
            else:
                a = g.set_index("id")["dice"]
                common = a.index.intersection(best.index)
                x, y = a.loc[common].to_numpy(), best.loc[common].to_numpy()
                row["rel_improvement_pct"] = float(
                    stats.relative_improvement_pct(dice["mean"], best_mean)
                )
                diff = stats.paired_difference(x, y, n_boot=n_boot, seed=seed)
                row["dice_diff_vs_best"] = diff["mean"]
                row["dice_diff_ci_low"], row["dice_diff_ci_high"] = diff["ci_low"], diff["ci_high"]
                row["p_value_vs_best_single"] = float(stats.paired_wilcoxon(x, y))
            rows.append(row)
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df.reindex(columns=[*RESULT_COLUMNS, *extra])


# ---------------------------------------------------------------------- the run
def candidate_models(store: PredictionStore) -> list[str]:
    """Complete models whose every listed split (and val) is readable; others are
    excluded with a warning, so one crashed job does not sink the study."""
    keep = []
    for model in store.models(status=None):
        try:
            manifest = store.read_manifest(model)
        except StoreError as err:
            warnings.warn(f"model {model!r} excluded: {err}", stacklevel=3)
            continue
        status = None if manifest is None else manifest.get("status")
        if status != "complete":
            why = "no manifest.json" if manifest is None else f"status {status!r}"
            if manifest and manifest.get("error"):
                why += f" ({manifest['error']})"
            warnings.warn(f"model {model!r} excluded: {why}", stacklevel=3)
            continue
        wanted = [VAL, *[s for s in manifest.get("splits") or [] if s in SPLITS]]
        if not store.is_complete(model, list(dict.fromkeys(wanted))):
            warnings.warn(
                f"model {model!r} excluded: a split in {wanted} is missing or unreadable",
                stacklevel=3,
            )
            continue
        try:
            store.verify(model, list(dict.fromkeys(wanted)))
        except StoreError as err:  # damaged bytes are never scored
            warnings.warn(f"model {model!r} excluded: {err}", stacklevel=3)
            continue
        keep.append(model)
    return keep


def choose_tta(
    store: PredictionStore, spec: EnsembleSpec, wanted: str, chunk_size: int = 16
) -> tuple[str, dict[str, dict[str, float]]]:
    """The test-time augmentation to use: `wanted`, or with `val` the stored variant whose
    soft vote (else the first rule) has the best mean validation Dice; a tie keeps none.
    Returns the choice and every variant's val Dice per rule."""
    have = [v for v in tta.VARIANTS if store.has_tta(spec.models, VAL, v)]
    if wanted != "val":
        if wanted not in have:
            raise StoreError(
                f"ensemble.tta={wanted}: a selected model has no {wanted!r} predictions "
                f"(trained before they were stored?); valid choices here: {', '.join(have)}"
            )
        return wanted, {}
    scores: dict[str, dict[str, float]] = {}
    for variant in have:
        data = store.open_split(spec.models, VAL, variant)
        per_image = evaluate_arrays(
            VAL, [data.probs[m] for m in spec.models], data.truth.masks, data.truth.ids,
            spec, chunk_size=chunk_size, distances=False, post=(),
        )  # fmt: skip
        means = per_image.groupby("method")["dice"].mean()
        scores[variant] = {rule: float(means[rule]) for rule in spec.rules}
    rule = "soft" if "soft" in spec.rules else spec.rules[0]
    return max(have, key=lambda v: (scores[v][rule], v == "none")), scores


def choose_postprocess(
    view: ValidationView, spec: EnsembleSpec, post: Sequence[str], chunk_size: int = 16
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Per rule, the post-processing (or `none`) with the best mean validation Dice; a tie
    keeps `none`. Returns the choice and every candidate's score."""
    if not post:
        return {}, {}
    data = view.open(spec.models)
    per_image = evaluate_arrays(
        view.split,
        [data.probs[m] for m in spec.models],
        data.truth.masks,
        data.truth.ids,
        spec,
        chunk_size=chunk_size,
        distances=False,
        post=post,
    )
    means = per_image.groupby("method")["dice"].mean()
    choice, scores = {}, {}
    for rule in spec.rules:
        scores[rule] = {
            "none": float(means[rule]),
            **{p: float(means[f"{rule}+{p}"]) for p in post},
        }
        choice[rule] = max(scores[rule], key=lambda p: (scores[rule][p], p == "none"))
    return choice, scores


# ---------------------------------------------------------------------- the run
@dataclass
class EnsembleSummary:
    """Everything one ensemble computes, for `spineseg.report.outputs` to write."""

    run_dir: Path
    set_id: str  # selection.json and results.json of one set carry the same id
    opts: dict[str, Any]
    selection: Selection
    spec: EnsembleSpec
    evaluated: dict[str, SplitData]  # the scored held-out splits, as opened
    per_image: pd.DataFrame
    results: pd.DataFrame
    units: dict[str, str]
    n_images: dict[str, int]
    temperatures: dict[str, float]
    calibrated: dict[str, dict[str, dict[str, Any]]]
    limits: dict[str, quality.Limits]
    flags_caught: dict[str, dict[str, dict[str, float]]]


def run_ensemble(run_dir: str | Path, cfg: Any = None) -> pd.DataFrame:
    """Select on val, evaluate every rule on test/external, write `<run_dir>/ensemble/`.

    Returns the results table (one row per split and method)."""
    from spineseg.report.outputs import write_set

    opts = ensemble_config(cfg)
    store = open_store(run_dir)
    candidates = candidate_models(store)
    if not candidates:
        raise StoreError(f"{store.root}: no complete model with a readable val split")
    final = Path(run_dir) / ENSEMBLE_DIR
    with staged_dir(final) as out_dir:  # a kill leaves the old complete set, or the new one
        summary = compute(store, candidates, opts)
        write_set(out_dir, summary)
    log.info("ensemble results written to %s", final)
    return summary.results


def open_store(run_dir: str | Path) -> PredictionStore:
    problem = not_a_run(run_dir)
    if problem:
        raise StoreError(problem)
    return PredictionStore(run_dir)


def compute(store: PredictionStore, candidates: list[str], opts: dict[str, Any]) -> EnsembleSummary:
    """The whole ensemble, in memory: select on val, score every split, the statistics, the
    temperatures and the quality limits."""
    selection, spec = choose(store, candidates, opts)
    evaluated, per_image, units = evaluate_splits(store, spec, selection, opts)
    results = summarize_results(per_image, spec, int(opts["n_boot"]), int(opts["seed"]), units)
    chunk = int(opts["chunk_size"])
    val = ValidationView(store, tta=selection.tta).open(spec.models)
    # Temperatures fitted on validation; ECE before and after on every split.
    temperatures = calibration.fit(val, spec, chunk)
    calibrated = calibration.assess({VAL: val, **evaluated}, spec, temperatures, chunk)
    results = _with_calibration(results, calibrated)
    # Quality flags: normal ranges from validation, then how well they catch poor results.
    limits, flags_caught, flag_rows = quality.assess(
        val, evaluated, spec, selection.postprocess, per_image, chunk
    )
    if flag_rows:
        per_image = per_image.merge(
            pd.DataFrame(flag_rows), on=["split", "method", "id"], how="left"
        )
    return EnsembleSummary(
        run_dir=store.run_dir, set_id=uuid.uuid4().hex, opts=opts, selection=selection,
        spec=spec, evaluated=evaluated, per_image=per_image, results=results, units=units,
        n_images={s: d.truth.n for s, d in evaluated.items()}, temperatures=temperatures,
        calibrated=calibrated, limits=limits, flags_caught=flags_caught,
    )  # fmt: skip


def choose(
    store: PredictionStore, candidates: list[str], opts: dict[str, Any]
) -> tuple[Selection, EnsembleSpec]:
    """Everything decided on validation: the models and their weights, the thresholds, the
    test-time augmentation and each rule's post-processing."""
    chunk = int(opts["chunk_size"])
    selection = select_models(
        ValidationView(store),
        candidates,
        k=int(opts["top_k"]),
        method=opts["selection"],
        greedy_size=int(opts["greedy_size"]),
        rules=opts["rules"],
        threshold=float(opts["threshold"]),
        tune_threshold=bool(opts["tune_threshold"]),
        chunk_size=chunk,
    )
    spec = EnsembleSpec.from_selection(selection, opts["rules"], float(opts["threshold"]))
    selection.tta, selection.tta_scores = choose_tta(store, spec, str(opts["tta"]), chunk)
    selection.postprocess, selection.postprocess_scores = choose_postprocess(
        ValidationView(store, tta=selection.tta), spec, opts["postprocess"], chunk
    )
    return selection, spec


def evaluate_splits(
    store: PredictionStore, spec: EnsembleSpec, selection: Selection, opts: dict[str, Any]
) -> tuple[dict[str, SplitData], pd.DataFrame, dict[str, str]]:
    """Per-image metrics of every method on each held-out split every selected model has;
    returns the opened splits, the per-image table and each split's distance unit."""
    frames, units, evaluated = [], {}, {}
    for split in opts["splits"]:
        have = [m for m in spec.models if store.has_tta([m], split, selection.tta)]
        if not have and not store.has_truth(split):
            log.info("split %r is not in the store: skipped", split)
            continue
        if len(have) < len(spec.models):
            missing = [m for m in spec.models if m not in have]
            warnings.warn(
                f"split {split!r} is missing for selected model(s) {', '.join(missing)}: skipped",
                stacklevel=2,
            )
            continue
        data = store.open_split(spec.models, split, selection.tta)
        spacing = data.truth.distance_spacing
        units[split] = "mm" if spacing is not None else "px"
        log.info(
            "evaluating %s: %d images, %d models, %d rules",
            split, data.truth.n, len(spec.models), len(spec.rules),
        )  # fmt: skip
        frames.append(
            evaluate_arrays(
                split,
                [data.probs[m] for m in spec.models],
                data.truth.masks,
                data.truth.ids,
                spec,
                spacing=spacing,
                chunk_size=int(opts["chunk_size"]),
                distances=bool(opts["distances"]),
                vertebrae=data.truth.vertebrae,
                post=opts["postprocess"],
            )
        )
        evaluated[split] = data
    if not frames:
        raise StoreError(
            f"{store.root}: none of the splits {opts['splits']} is stored for the selected models"
        )
    return evaluated, pd.concat(frames, ignore_index=True), units


def _with_calibration(results: pd.DataFrame, calibrated: Mapping[str, Any]) -> pd.DataFrame:
    """results gain `temperature`, `ece` and `ece_calibrated` for each rule and model (the
    rows of post-processed labels share their rule's probabilities: left empty)."""
    rows = [
        {
            "split": split,
            "method": name,
            **{k: c[k] for k in ("temperature", "ece", "ece_calibrated")},
        }
        for split, names in calibrated.items()
        for name, c in names.items()
    ]
    cols = ["temperature", "ece", "ece_calibrated"]
    merged = results.drop(columns=cols).merge(
        pd.DataFrame(rows), on=["split", "method"], how="left"
    )
    return merged.reindex(columns=list(results.columns))
