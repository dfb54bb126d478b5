"""What a model has to beat on level: an atlas that never looks at the film.

The atlas is the mean of the training films' region masks at the working resolution,
thresholded where it scores best on those same training films, and it is placed unchanged
on every held-out film. Its Dice and level-error rate (the metric of
`spineseg.ensemble.metrics.level_metrics`) say how much of a model's score the films'
framing alone explains: on AASCE, where every film runs from about T1 to the sacrum, the
Th8..Th11 region sits at nearly the same height on every film.

    uv run python benchmarks/level_baseline.py data=aasce data.root=/path/to/boostnet_labeldata \
        'data.image_size=[384,160]' [--split val]

Any `spineseg-train` data override composes the dataset; the split is the run's own
(70/10/20 by patient, `data.split_seed`), so the numbers line up with a run's results.csv.
The atlas is `spineseg.ensemble.baseline.fit_atlas`, the one `spineseg-score` places on
every held-out film at its own resolution (its `atlas` row); this script needs no trained
run, and adds two more yardsticks:

- the region's centroid at the training films' median position on the film;
- the *column proportion*: given the truth's labelled column (the top of its first labelled
  vertebra to the bottom of its last, T1..L5 on AASCE), the region placed at the training
  films' median fraction of it. It is what a model that found both ends of the column
  exactly and placed the region by proportion would reach; it needs the truth's column, so
  it is a ceiling for that strategy, not a baseline a model could run.

`--run RUN_DIR` compares a trained run's per-film level offsets (`spineseg-score`'s
`film_scores/<split>/per_image.csv`, soft vote) with those of the film-height placement and
of the column proportion: a Pearson r near 1 with the first means the run places the region
where the framing puts it.

    uv run python benchmarks/level_baseline.py data=aasce data.root=... \
        'data.image_size=[384,160]' --run outputs/aasce_rf/light
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from common import machine
from hydra.errors import HydraException
from scipy import ndimage

from spineseg.config import build
from spineseg.ensemble.baseline import fit_atlas
from spineseg.ensemble.metrics import (
    LEVEL_ERROR_PITCHES,
    level_metrics,
    overlap_metrics,
    spine_axis,
)
from spineseg.ensemble.stats import proportion_ci, summarize
from spineseg.errors import SpinesegError
from spineseg.names import LEVELS, STORED_SPLITS


def _along(mask: np.ndarray, axis: dict, i: int) -> np.ndarray:
    """Each pixel of `mask` projected on film i's spine axis (the units of `spine_axis`)."""
    rows, cols = np.nonzero(mask)
    return (np.stack([rows, cols], 1) * axis["scale"][i]) @ axis["unit"][i]


def column_fractions(
    labels: np.ndarray, axis: dict, ends: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per film, the truth region's centroid as a fraction of its labelled column along the
    axis (0 at the top of level value ends[0], 1 at the bottom of ends[1]), and the column's
    length; both NaN where either end is not labelled or the axis is unknown."""
    fraction, length = np.full(len(labels), np.nan), np.full(len(labels), np.nan)
    for i, lab in enumerate(labels):
        if (
            not np.isfinite(axis["pitch"][i])
            or not (lab == ends[0]).any()
            or not (lab == ends[1]).any()
        ):
            continue
        top, bottom = _along(lab == ends[0], axis, i).min(), _along(lab == ends[1], axis, i).max()
        length[i] = bottom - top
        fraction[i] = (axis["centre"][i] @ axis["unit"][i] - top) / length[i]
    return fraction, length


def column_ends(labels: np.ndarray) -> tuple[int, int]:
    """The level values that most training films label first and last."""
    present = [np.unique(lab[lab > 0]) for lab in labels]
    present = [p for p in present if len(p)]
    firsts, lasts = np.array([p[0] for p in present]), np.array([p[-1] for p in present])
    return int(np.bincount(firsts).argmax()), int(np.bincount(lasts).argmax())


def _rate(offset: np.ndarray) -> dict:
    return proportion_ci(
        np.where(np.isfinite(offset), np.abs(offset) > LEVEL_ERROR_PITCHES, np.nan)
    )


def _line(what: str, rate: dict) -> str:
    return (
        f"{what}: level errors {100 * rate['rate']:.1f}% [{100 * rate['ci_low']:.1f}, "
        f"{100 * rate['ci_high']:.1f}] ({round(rate['rate'] * rate['n'])} of {rate['n']} films)"
    )


def compare_run(run_dir: Path, split: str, ids: list[str], yardsticks: dict) -> list[str]:
    """How a run's soft-vote level offsets (film scores) follow each yardstick's, film by film."""
    import pandas as pd

    path = run_dir / "film_scores" / split / "per_image.csv"
    if not path.is_file():
        sys.exit(f"error: {path} not found: run `spineseg-score run_dir={run_dir} split={split}`")
    table = pd.read_csv(path)
    run = table[table["method"] == "soft"].set_index("id")["level_offset"].reindex(ids)
    if run.notna().sum() < 2:
        sys.exit(
            f"error: {path} scores {int(run.notna().sum())} of the {len(ids)} {split} films "
            "this data config makes: is it a run on the same data and split?"
        )
    wrong = np.abs(run.to_numpy()) > LEVEL_ERROR_PITCHES
    lines = [f"{run_dir} (soft vote): {int(wrong.sum())} level errors of {int(run.notna().sum())}"]
    for name, offset in yardsticks.items():
        ok = np.isfinite(offset) & run.notna().to_numpy()
        r = np.corrcoef(run.to_numpy()[ok], offset[ok])[0, 1]
        same = (
            wrong
            & (np.abs(offset) > LEVEL_ERROR_PITCHES)
            & (np.sign(offset) == np.sign(run.to_numpy()))
        )
        lines.append(
            f"  vs {name}: Pearson r {r:.2f} over {int(ok.sum())} films; "
            f"{int(same.sum())} of the run's level errors are the yardstick's too, same direction"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="spineseg-train data overrides")
    ap.add_argument("--split", default="val", choices=[s for s in STORED_SPLITS if s != "external"])
    ap.add_argument("--run", type=Path, help="a scored run to compare, film by film")
    args = ap.parse_args()
    try:
        dm = build("data", args.overrides, run_dir=None)
        dm.setup()
    except (HydraException, SpinesegError) as err:
        sys.exit(f"error: {str(err).splitlines()[0]}")
    train, held = dm.parts["train"], dm.parts[args.split]
    masks = train.masks("region")
    fitted = fit_atlas(masks, 2)  # the atlas spineseg-score places, here at the working size
    best, atlas = fitted.threshold, fitted.labels(masks.shape[1:])
    pred = np.broadcast_to(atlas, held.labels.shape)
    truth = held.masks("region")
    axis = spine_axis(held.vertebrae(), held.spacing)
    levels = level_metrics(pred, axis)
    dice = summarize(overlap_metrics(pred, truth, 2)["dice"])
    rate = proportion_ci(levels["level_error"])
    # the region's centroid alone at the training films' median position, measured as
    # level_metrics measures a prediction's centroid against the truth's
    where = np.nanmedian([ndimage.center_of_mass(m) for m in masks], axis=0)
    offset = np.einsum("ij,ij->i", where * axis["scale"] - axis["centre"], axis["unit"])
    offset /= axis["pitch"]
    median = _rate(offset)
    # the column proportion: the truth's own column, the training films' median fraction
    ends = column_ends(train.labels)
    train_axis = spine_axis(train.vertebrae(), train.spacing)
    fraction = np.nanmedian(column_fractions(train.labels, train_axis, ends)[0])
    held_fraction, length = column_fractions(held.labels, axis, ends)
    proportion = (fraction - held_fraction) * length / axis["pitch"]
    print(f"# {machine()}")
    print(
        f"atlas of {len(train.ids)} training films, cut at {best:.2f}; {args.split} split "
        f"({rate['n']} films):"
    )
    print(f"  Dice {dice['mean']:.3f} [{dice['ci_low']:.3f}, {dice['ci_high']:.3f}]")
    print(_line("  the atlas", rate))
    print(_line("centroid at the training films' median position", median))
    print(
        _line(
            f"column proportion (truth's {LEVELS[ends[0] - 1]}..{LEVELS[ends[1] - 1]}, "
            f"region at {fraction:.3f} of it)",
            _rate(proportion),
        )
    )
    if args.run is not None:
        yardsticks = {"the median position": offset, "the column proportion": proportion}
        print("\n".join(compare_run(args.run, args.split, list(held.ids), yardsticks)))


if __name__ == "__main__":
    main()
