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
run, and adds the median-position prior.
"""

from __future__ import annotations

import argparse
import sys

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
from spineseg.names import STORED_SPLITS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="spineseg-train data overrides")
    ap.add_argument("--split", default="val", choices=[s for s in STORED_SPLITS if s != "external"])
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
    median = proportion_ci(
        np.where(np.isfinite(offset), np.abs(offset) > LEVEL_ERROR_PITCHES, np.nan)
    )
    print(f"# {machine()}")
    print(
        f"atlas of {len(train.ids)} training films, cut at {best:.2f}; {args.split} split "
        f"({rate['n']} films):"
    )
    print(f"  Dice {dice['mean']:.3f} [{dice['ci_low']:.3f}, {dice['ci_high']:.3f}]")
    print(
        f"  level errors {100 * rate['rate']:.1f}% [{100 * rate['ci_low']:.1f}, "
        f"{100 * rate['ci_high']:.1f}] ({round(rate['rate'] * rate['n'])} films)"
    )
    print(
        f"centroid at the training films' median position: level errors "
        f"{100 * median['rate']:.1f}% [{100 * median['ci_low']:.1f}, {100 * median['ci_high']:.1f}]"
    )


if __name__ == "__main__":
    main()
