"""Does a model find Th8..Th11 by anatomy, or by where it sits on the film?

Films of one dataset are framed alike (AASCE from just above T1 to the sacrum), so a model
can score well on its own held-out films by learning the region's height on the film, and
then miss the level on every film framed differently. This benchmark cuts each of a run's
held-out films at its top and/or bottom (a fixed share of the film's height), runs the run's
selected ensemble on the cut film exactly as `spineseg-predict` would, and scores it
against the truth cut the same way, with the package's own metrics (Dice, the level-error
rate of `spineseg.ensemble.metrics.level_metrics`, Wilson CI). A model that counts
vertebrae keeps its level-error rate; one that learned the framing loses it.

    uv run python benchmarks/reframed.py outputs/aasce/run_a outputs/aasce/run_b [--split val] [--atlas]

Cuts are of the original film, before the working resize, so a cut film is what a
differently framed acquisition would give. Read the validation split to choose; the test
split only once, at the end.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import machine

from spineseg.ensemble.stats import proportion_ci, summarize
from spineseg.errors import SpinesegError
from spineseg.names import STORED_SPLITS
from spineseg.report.film_scores import (
    delivered_target,
    film_metrics,
    film_truth,
    held_out_films,
    known_spacings,
    training_atlas,
)

#: (top, bottom) shares of the film's height cut away; (0, 0) is the film as it came.
CUTS = ((0.0, 0.0), (0.15, 0.0), (0.0, 0.15), (0.1, 0.1))


def cut(sample, top: float, bottom: float):
    """The film and its truth without the top and bottom shares of its rows."""
    h = sample.image.shape[0]
    y0, y1 = round(top * h), h - round(bottom * h)
    return replace(sample, image=sample.image[y0:y1].copy(), label=sample.label[y0:y1].copy())


def score(
    run_dir: Path, split: str, rule: str, atlas: bool = False, batch: int = 4
) -> dict[tuple, dict]:
    """Per cut, each film's Dice and level error: of the run's ensemble, or (`atlas`) of the
    film-blind atlas of its training films (`spineseg.ensemble.baseline`)."""
    from spineseg.predict import load_ensemble

    samples, selection, training = held_out_films(run_dir, split, training=atlas)
    if atlas:  # the atlas needs only what the run delivers, not its checkpoints
        ens, target = None, delivered_target(run_dir, selection)
        reference = training_atlas(training, target)
        if reference is None:
            sys.exit(f"error: {run_dir}: no training film with a mask to build the atlas from")
    else:
        ens = load_ensemble(run_dir, rule, "cpu")
        target, reference = ens.target, None
    del training
    spacings = known_spacings(samples)
    out = {}
    for top, bottom in CUTS:
        films = [cut(s, top, bottom) for s in samples]
        truths = [film_truth(f, target, sp) for f, sp in zip(films, spacings, strict=True)]
        rows = []
        for lo in range(0, len(films), batch):
            part = films[lo : lo + batch]
            labels = (
                [reference.labels(f.image.shape[:2]) for f in part]
                if reference is not None
                else [p.labels for p in ens.predict_batch([f.image for f in part])]
            )
            part_truths = truths[lo : lo + batch]
            rows += [film_metrics(x, t) for x, t in zip(labels, part_truths, strict=True)]
        out[(top, bottom)] = {
            "ids": [s.id for s in samples],
            "dice": np.array([r["dice"] for r in rows]),
            "level_error": np.array([r["level_error"] for r in rows]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, help="finished runs (spineseg-ensemble ran)")
    ap.add_argument("--split", default="val", choices=[s for s in STORED_SPLITS if s != "external"])
    ap.add_argument("--rule", default="soft")
    ap.add_argument("--atlas", action="store_true", help="also the film-blind atlas")
    args = ap.parse_args()
    print(f"# {machine()}")
    print(f"# {args.split} films, rule {args.rule}; cuts are shares of the film's height")
    print("| run | cut (top, bottom) | Dice [95% CI] | level errors [95% CI] |")
    print("|---|---|---|---:|")
    # the first run's training films give the atlas: film-blind, so one row serves all runs
    jobs = [(args.run_dirs[0], True, "atlas"), *[(r, False, r.name) for r in args.run_dirs]]
    for run_dir, atlas, name in jobs if args.atlas else jobs[1:]:
        try:
            scores = score(run_dir, args.split, args.rule, atlas)
        except SpinesegError as err:
            sys.exit(f"error: {str(err).splitlines()[0]}")
        for (top, bottom), s in scores.items():
            d, r = summarize(s["dice"]), proportion_ci(s["level_error"])
            print(
                f"| {name} | {top:.2f}, {bottom:.2f} | {d['mean']:.3f} "
                f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}] | {100 * r['rate']:.1f}% "
                f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] "
                f"({round(r['rate'] * r['n'])}/{r['n']}) |"
            )


if __name__ == "__main__":
    main()
