"""What `spineseg-predict` delivers, scored: a run's selected ensemble (each rule asked for)
and its best single model applied to the run's own held-out films at the films' original
resolution, against the truth drawn there.

Why beside `ensemble/results.csv`: the evaluator scores at the working resolution (a
cascade's stage 2 inside its crop), so runs with different working sizes, or a cascade and a
whole-film run, cannot be compared there. At the film's resolution they can, and that is
what a user receives. The tables are the evaluator's own (`evaluate.summarize_results`), so
every column means the same; they go to `<run_dir>/film_scores/<split>/` as one set.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from spineseg.data.sample import Sample
from spineseg.ensemble import metrics
from spineseg.ensemble import postprocess as post
from spineseg.ensemble.baseline import Atlas, fit_atlas, on_grid
from spineseg.ensemble.evaluate import (
    DEFAULTS,
    METRICS,
    PER_IMAGE_COLUMNS,
    EnsembleSpec,
    summarize_results,
)
from spineseg.errors import ConfigError, DataError, StoreError, choices_message
from spineseg.labels import target_masks, vertebra_labels
from spineseg.names import (
    ATLAS,
    BEST,
    CHANNELS,
    EXTERNAL,
    FILM_SCORES_DIR,
    PREDICTIONS_DIR,
    SELECTION,
    STORED_SPLITS,
    TRAIN,
    post_method,
)
from spineseg.report.outputs import write_results
from spineseg.utils.paths import not_a_run

if TYPE_CHECKING:
    from spineseg.data.level_check import FilmCheck

log = logging.getLogger(__name__)


#: `level_corrections` of spineseg-score: the truth as training read it (the run's own
#: `data.level_corrections`, if any), or the labels as given (`none`), or another CSV.
RUN_LABELS, AS_GIVEN = "run", "none"


def _read_json(path: Path, what: str, missing: str) -> dict[str, Any]:
    """`predict.read_json_object`, saying what to do where the file is not there yet."""
    from spineseg.predict import read_json_object

    if not path.is_file():
        raise StoreError(f"{path} does not exist: {missing}")
    return read_json_object(path, what)


def run_data(run_dir: Path, selection: dict[str, Any]) -> dict[str, Any]:
    """The selected models' `data` config, as training recorded it in the manifest."""
    name = selection["models"][0]
    path = run_dir / PREDICTIONS_DIR / str(name) / "manifest.json"
    manifest = _read_json(path, "manifest", f"selected model {name!r} has no manifest")
    data = (manifest.get("config") or {}).get("data")
    if not isinstance(data, dict):
        raise StoreError(f"{path}: no config.data recorded")
    return data


def delivered_target(run_dir: str | Path, selection: dict[str, Any]) -> str:
    """What the run's ensemble delivers (a `levels` run: the region), from its recorded
    config, without loading a checkpoint."""
    from spineseg.predict import Pipeline

    return (
        Pipeline.from_config({"data": run_data(Path(run_dir), selection)}, Path(run_dir))
        .shared()
        .target
    )


def held_out_films(
    run_dir: str | Path,
    split: str,
    data_root: str | None = None,
    training: bool = False,
    labels: str = RUN_LABELS,
) -> tuple[list[Sample], dict[str, Any], list[Sample]]:
    """The run's `split` films, at their own resolution, in the store's order: the films the
    results scored, read again from the source training recorded (`data_root` where the
    films have moved since; `labels` other level corrections than training's). Returns them,
    the selection and, with `training`, the run's training films (splits.csv; read in the
    same pass over the source where it is the same source, since reading a folder of
    full-size films is most of the time this takes)."""
    from spineseg.data.splits import read_splits_csv
    from spineseg.ensemble.store import PredictionStore

    run_dir = Path(run_dir)
    if split not in STORED_SPLITS:
        raise ConfigError(choices_message("split", split, list(STORED_SPLITS)))
    problem = not_a_run(run_dir)
    if problem:
        raise StoreError(problem)
    selection = _read_json(
        run_dir / SELECTION, "selection", f"run `spineseg-ensemble run_dir={run_dir}` first"
    )
    store = PredictionStore(run_dir)
    if not store.has_truth(split):
        there = [s for s in STORED_SPLITS if store.has_truth(s)]
        raise StoreError(f"{run_dir}: the store has no {split!r} split; there: {', '.join(there)}")
    ids = [str(i) for i in store.truth(split).ids]
    splits_csv = run_dir / "splits.csv"
    train = (
        [i for i, sp in read_splits_csv(splits_csv).items() if sp == TRAIN]
        if training and splits_csv.is_file()
        else []
    )
    if split == EXTERNAL:
        held = _source_films(run_dir, selection, True, {split: ids}, data_root, labels)[split]
        rest = _source_films(run_dir, selection, False, {TRAIN: train}, data_root, labels)
        return held, selection, rest[TRAIN]
    got = _source_films(run_dir, selection, False, {split: ids, TRAIN: train}, data_root, labels)
    return got[split], selection, got[TRAIN]


def _source_films(
    run_dir: Path,
    selection: dict[str, Any],
    external: bool,
    wanted: dict[str, Sequence[str]],
    data_root: str | None,
    labels: str = RUN_LABELS,
) -> dict[str, list[Sample]]:
    """The films of each split in `wanted` (split -> ids), in one pass over the source
    training recorded (`external`: the external set's own)."""
    from spineseg.data.sources import build_spec

    if not any(wanted.values()):
        return {split: [] for split in wanted}
    data = run_data(run_dir, selection)
    spec = dict(data.get("external") or {}) if external else dict(data)
    if data_root is not None:
        if spec.get("root") is None:
            raise ConfigError(
                f"data_root={data_root}: the films of this run come from the "
                f"{spec.get('source')} source, which reads no folder; leave data_root out"
            )
        spec["root"] = data_root
    if labels != RUN_LABELS:
        spec["level_corrections"] = None if labels == AS_GIVEN else labels
    skipped: list = []
    every = {i for ids in wanted.values() for i in ids}
    found = {s.id: s for s in build_spec(spec, on_error="skip", skipped=skipped) if s.id in every}
    for split, ids in wanted.items():
        missing = [i for i in ids if i not in found]
        if missing:
            raise DataError(
                spec.get("root"),
                f"{len(missing)} of the run's {len(ids)} {split} films are not in this source "
                f"(first: {missing[0]!r}); data_root= points at the films where they are now",
            )
    return {split: [found[i] for i in ids] for split, ids in wanted.items()}


def training_atlas(films: Sequence[Sample], target: str) -> Atlas | None:
    """The film-blind atlas (`spineseg.ensemble.baseline`) of a run's training films
    (`held_out_films(..., training=True)`); None where no training film has a mask."""
    maps = [
        on_grid(target_masks(s.label[None], np.array([s.binary_label]), target)[0]) for s in films
    ]
    if not any(m.any() for m in maps):
        return None
    return fit_atlas(maps, max(2, CHANNELS[target]))


def known_spacings(samples: Sequence[Sample]) -> list[Any]:
    """Each film's pixel spacing where every film has a valid one (distances in mm), else
    None for all (distances in pixels): one unit for the whole split."""
    spacings = [s.spacing for s in samples]
    known = all(sp is not None and all(np.isfinite(sp)) and min(sp) > 0 for sp in spacings)
    return spacings if known else [None] * len(samples)


@dataclass(frozen=True)
class FilmTruth:
    """One film's truth at its own resolution, drawn once for every method scored on it."""

    masks: np.ndarray  # (1, H, W) what the ensemble delivers: region, or Th8..Th11 as 1..4
    axis: dict[str, np.ndarray] | None  # the spine's axis (level metrics); None: binary mask
    spacing: np.ndarray | None  # (1, 2) mm, or None: distances in pixels
    num_classes: int  # as the store's: region 2, vertebrae 5


def film_truth(sample: Sample, target: str, spacing: Sequence[float] | None) -> FilmTruth:
    sp = None if spacing is None else np.asarray([spacing], dtype=np.float64)
    masks = target_masks(sample.label[None], np.array([sample.binary_label]), target)
    axis = (
        None if sample.binary_label else metrics.spine_axis(vertebra_labels(sample.label)[None], sp)
    )
    return FilmTruth(masks, axis, sp, max(2, CHANNELS[target]))


def film_metrics(labels: np.ndarray, truth: FilmTruth) -> dict[str, float]:
    """One film's per-image metrics (the evaluator's columns), at its own resolution."""
    pred, k = labels[None], truth.num_classes
    out = {key: float(v[0]) for key, v in metrics.overlap_metrics(pred, truth.masks, k).items()}
    surface = metrics.surface_metrics(pred, truth.masks, k, truth.spacing)
    out.update({key: float(v[0]) for key, v in surface.items()})
    if truth.axis is None:
        out.update({key: float("nan") for key in metrics.LEVEL_KEYS})
    else:
        out.update({key: float(v[0]) for key, v in metrics.level_metrics(pred, truth.axis).items()})
    return out


def score_films(
    run_dir: str | Path,
    split: str = "val",
    rules: Sequence[str] = ("soft",),
    device: str = "cpu",
    data_root: str | None = None,
    batch_size: int = 4,
    atlas: bool = True,
    labels: str = RUN_LABELS,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(per_image, results, meta) of `best_single` and each rule, with and without the
    post-processing validation chose for it, on the run's `split` films at their own size;
    with `atlas`, also the film-blind atlas of the run's training films (`ATLAS`). `labels`:
    the level corrections of the truth (`RUN_LABELS`, `AS_GIVEN` or a CSV)."""
    from spineseg.ensemble import rules as R
    from spineseg.predict import load_ensemble

    run_dir = Path(run_dir)
    for rule in rules:
        R.get(rule)
    samples, selection, training = held_out_films(
        run_dir, split, data_root, training=atlas, labels=labels
    )
    spacings = known_spacings(samples)
    known = spacings[0] is not None if spacings else False
    chosen = selection.get("postprocess") or {}
    posts = sorted({str(chosen.get(r, "none")) for r in rules} - {"none"})
    cols: dict[str, list[Any]] = {c: [] for c in PER_IMAGE_COLUMNS}

    def add(method: str, sample_id: str, row: dict[str, float]) -> None:
        cols["split"].append(split)
        cols["method"].append(method)
        cols["id"].append(sample_id)
        for key in (*METRICS, *metrics.LEVEL_KEYS):
            cols[key].append(row[key])

    def run(method: str, ensemble: Any) -> None:
        start = time.perf_counter()
        for lo in range(0, len(samples), batch_size):
            part = samples[lo : lo + batch_size]
            for s, truth, p in zip(
                part, truths[lo : lo + batch_size], ensemble.predict_batch([x.image for x in part]),
                strict=True,
            ):  # fmt: skip
                for name in ("none", *posts):
                    labels = p.labels if name == "none" else post.apply(name, p.labels)
                    add(post_method(method, name), s.id, film_metrics(labels, truth))
        log.info(
            "%s: %d %s films in %.0f s", method, len(samples), split, time.perf_counter() - start
        )

    model_threshold = float(selection.get("model_threshold", DEFAULTS["threshold"]))
    first = load_ensemble(run_dir, rules[0], device, postprocess="none")
    # every method delivers the same target, so each film's truth is drawn once
    truths = [film_truth(s, first.target, sp) for s, sp in zip(samples, spacings, strict=True)]
    reference = training_atlas(training, first.target) if atlas else None
    del training  # the atlas is all that is kept of them, before the models run
    run(BEST, first.member(str(selection["best_single"]), model_threshold))
    for rule in rules:
        ensemble = first if rule == rules[0] else load_ensemble(run_dir, rule, device, "none")
        run(rule, ensemble)
    if reference is not None:
        for s, truth in zip(samples, truths, strict=True):
            add(ATLAS, s.id, film_metrics(reference.labels(s.image.shape[:2]), truth))
    per_image = pd.DataFrame(cols, columns=list(PER_IMAGE_COLUMNS))
    thresholds = {r: float((selection.get("thresholds") or {}).get(r, 0.5)) for r in rules}
    if reference is not None:
        thresholds[ATLAS] = reference.threshold
    spec = EnsembleSpec(
        models=list(selection["models"]),
        weights=list(selection.get("weights") or []),
        rules=list(rules),
        thresholds=thresholds,
        best_single=str(selection["best_single"]),
        threshold=model_threshold,
    )
    unit = {split: "mm" if known else "px"}
    results = summarize_results(
        per_image, spec, int(DEFAULTS["n_boot"]), int(DEFAULTS["seed"]), unit
    )
    meta = {
        "set_id": uuid.uuid4().hex,
        "selection_set_id": selection.get("set_id"),
        "split": split,
        "labels": labels,
        "resolution": "film",
        "n_images": {split: len(samples)},
        "rules": list(rules),
        "postprocess": posts,
        "atlas": None
        if reference is None
        else {"threshold": reference.threshold, "n_training_films": reference.n},
    }
    return per_image, results, meta


def against(
    per_image: pd.DataFrame, other_run: str | Path, split: str, methods: Sequence[str]
) -> list[dict[str, Any]]:
    """Each method against the same method of another run's film scores on the same films:
    the paired Dice difference (bootstrap 95% CI over films), Wilcoxon p and level errors.
    At the films' resolution two runs compare whatever their working sizes or crops."""
    path = film_scores_dir(other_run, split) / "per_image.csv"
    if not path.is_file():
        raise StoreError(f"{path} does not exist: run `spineseg-score run_dir={other_run}` first")
    theirs = pd.read_csv(path)
    out = []
    for method in methods:
        a = per_image[per_image["method"] == method].set_index("id")
        b = theirs[theirs["method"] == method].set_index("id")
        if b.empty:
            there = ", ".join(dict.fromkeys(theirs["method"]))
            raise StoreError(f"{path}: no {method!r}; there: {there}")
        if set(a.index) != set(b.index):
            raise StoreError(
                f"{path}: scores {len(b)} {split} films, this run {len(a)}; a paired comparison "
                "needs the same films (the same data and splits.csv)"
            )
        out.append({"method": method, "other_run": str(other_run), **paired(a, b.loc[a.index])})
    return out


def paired(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """Two runs' per-film rows (`dice`, `level_error`) on the same films, in the same order:
    the paired Dice difference a - b (bootstrap 95% CI over films), Wilcoxon p and the level
    errors of each and of both."""
    from spineseg.ensemble import stats

    diff = stats.paired_difference(
        a["dice"], b["dice"], int(DEFAULTS["n_boot"]), seed=int(DEFAULTS["seed"])
    )
    ea, eb = a["level_error"].to_numpy(), b["level_error"].to_numpy()
    return {
        "n": len(a), "dice_diff": diff["mean"], "dice_diff_ci_low": diff["ci_low"],
        "dice_diff_ci_high": diff["ci_high"], "p_value": stats.paired_wilcoxon(a["dice"], b["dice"]),
        "level_errors": int(np.nansum(ea)), "other_level_errors": int(np.nansum(eb)),
        "level_errors_both": int(np.nansum(ea * eb)),
    }  # fmt: skip


def against_text(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method: `soft vs <run>: +0.006 [-0.010, +0.021], p = 0.41; ...`."""
    return "\n".join(
        f"{r['method']} vs {r['other_run']}: paired Δ Dice {r['dice_diff']:+.3f} "
        f"[{r['dice_diff_ci_low']:+.3f}, {r['dice_diff_ci_high']:+.3f}], Wilcoxon p = "
        f"{r['p_value']:.2g}; level errors {r['level_errors']} vs {r['other_level_errors']} "
        f"of {r['n']} films ({r['level_errors_both']} in both)"
        for r in rows
    )


def label_verdicts(path: str | Path, run_dir: str | Path, split: str) -> dict[str, FilmCheck]:
    """The level check's verdicts (`spineseg-validate-data level_offsets=`), read and
    matched against the run's `split` films before any film is scored."""
    from spineseg.data.level_check import read_offsets
    from spineseg.ensemble.store import PredictionStore

    films = read_offsets(path)
    store = PredictionStore(run_dir)
    ids = {str(i) for i in store.truth(split).ids} if store.has_truth(split) else set()
    if ids and not ids & set(films):
        raise DataError(
            path,
            f"none of the run's {len(ids)} {split} films is in it: check the levels of the "
            "run's own data (spineseg-validate-data data=... level_offsets=<csv>)",
        )
    return films


def by_label_agreement(
    per_image: pd.DataFrame, films: Mapping[str, FilmCheck]
) -> list[dict[str, Any]]:
    """Each method's Dice and level-error rate (Wilson 95% CI) on the films whose labels the
    level check (`spineseg.data.level_check`, its CSV) found agreeing with their patient's
    other films, differing, or could not check. Where labels differ, a level error may be the
    label's; the rate on agreeing films is the one that speaks of the model."""
    from spineseg.data.level_check import AGREEMENT, agreement
    from spineseg.ensemble import stats

    group = per_image["id"].astype(str).map(lambda i: agreement(films, i))
    rows = []
    for method in dict.fromkeys(per_image["method"]):
        for key in AGREEMENT:
            part = per_image[(per_image["method"] == method) & (group == key)]
            if part.empty:
                continue
            rate = stats.proportion_ci(part["level_error"].to_numpy(dtype=float))
            rows.append({
                "method": method, "films": key, "n": len(part), "dice": float(part["dice"].mean()),
                "level_error_rate": rate["rate"], "level_error_ci_low": rate["ci_low"],
                "level_error_ci_high": rate["ci_high"],
            })  # fmt: skip
    return rows


def agreement_text(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method and group of films: Dice and level errors with their interval."""
    from spineseg.data.level_check import AGREEMENT
    from spineseg.report.tables import level_text

    return "\n".join(
        f"{r['method']}, {r['n']} films {AGREEMENT[r['films']]}: Dice {r['dice']:.3f}, level "
        "errors " + level_text(r["level_error_rate"], r["level_error_ci_low"],
                               r["level_error_ci_high"])
        for r in rows
    )  # fmt: skip


def film_scores_dir(run_dir: str | Path, split: str, labels: str = RUN_LABELS) -> Path:
    """`film_scores/<split>/`; scored against other labels than training's,
    `film_scores/<split>+labels_<as_given | the CSV's stem>/`, beside it, never over it."""
    if labels != RUN_LABELS:
        tag = "as_given" if labels == AS_GIVEN else Path(labels).stem
        split = f"{split}+labels_{tag}"
    return Path(run_dir) / FILM_SCORES_DIR / split


def scored_for(run_dir: str | Path, split: str, selection_set_id: str | None) -> bool:
    """Whether `film_scores/<split>/` holds a whole set scored for this very selection (a
    rerun of the ensemble makes it stale)."""
    path = film_scores_dir(run_dir, split) / "results.json"
    if not path.is_file() or not (path.parent / "results.csv").is_file():
        return False
    try:
        return json.loads(path.read_text()).get("selection_set_id") == selection_set_id
    except (OSError, ValueError):
        return False


def write_film_scores(
    run_dir: str | Path, per_image: pd.DataFrame, results: pd.DataFrame, meta: dict[str, Any]
) -> Path:
    """`<run_dir>/film_scores/<split>/`: results.csv / .md / .json and per_image.csv, swapped in
    as one set (an interrupted scoring leaves the previous set whole)."""
    from spineseg.utils.io import staged_dir

    final = film_scores_dir(run_dir, str(meta["split"]), str(meta.get("labels", RUN_LABELS)))
    with staged_dir(final) as out:
        write_results(out, results, per_image, meta)
    return final
