"""Coarse to fine: stage 2 sees a crop of the original film around what stage 1 found.

Stage 1 is any finished run (`data.crop.stage1=<run_dir>`): its selected ensemble segments the
region on the whole film at its own, low, working resolution. Stage 2 (the run that sets
`data.crop`) trains and predicts on a crop of the *original* film around that region,
resized to its own working size, so that vertebra edges keep their detail.

- Training films are cropped around their truth, moved and scaled at random by up to
  `jitter` (seeded by the film's id), so stage 2 learns to tolerate stage 1's misses.
- Validation, test and external films are cropped where stage 1 finds the region, exactly
  as predict crops a new film, so validation measures what predict will deliver.
- Every box grows by `margin` (a fraction of its height, on every side) and is clamped to
  the film. A film on which stage 1 finds nothing keeps the whole film, and is flagged.

`<run_dir>/crops.csv` records every film's box, where it came from and how much of the
truth's region it keeps; every job of a sweep reads the same file, so the members share
one ground truth. Stage 1 must have been trained on the same training films: a stage 1
that saw a validation or test film would leak it, and is refused.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from spineseg.data.sample import Sample
from spineseg.errors import ConfigError, DataError
from spineseg.labels import region_mask
from spineseg.names import SELECTION, TRAIN
from spineseg.utils.io import atomic_write_text
from spineseg.utils.paths import rebased

log = logging.getLogger(__name__)

CROPS_CSV = "crops.csv"
SOURCES = ("truth", "stage1", "whole")  # where a box came from
_COLUMNS = ["id", "split", "source", "y0", "x0", "y1", "x1", "height", "width", "clamped",
            "truth_kept"]  # fmt: skip


@dataclass(frozen=True)
class Box:
    """A half-open pixel box [y0, y1) x [x0, x1) of a film."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def crop(self, array: np.ndarray) -> np.ndarray:
        return array[self.y0 : self.y1, self.x0 : self.x1]

    def paste(self, part: np.ndarray, shape: tuple[int, int], fill: float = 0) -> np.ndarray:
        """`part` (the box's size) put back on a canvas of the film's `shape`; `crop` of the
        result is `part` exactly."""
        if part.shape[:2] != (self.height, self.width):
            raise ValueError(f"a {part.shape[:2]} array does not fit the box {self}")
        out = np.full((*shape, *part.shape[2:]), fill, dtype=part.dtype)
        out[self.y0 : self.y1, self.x0 : self.x1] = part
        return out


@dataclass(frozen=True)
class CropSpec:
    """`data.crop`: which run is stage 1, and how its boxes are grown and jittered."""

    stage1: str
    rule: str = "soft"
    margin: float = 0.5
    jitter: float = 0.15

    @classmethod
    def from_config(cls, crop: Mapping[str, Any] | None) -> CropSpec | None:
        if not crop:
            return None
        unknown = set(crop) - {"stage1", "rule", "margin", "jitter"}
        if unknown:
            raise ConfigError(
                f"data.crop: unknown option {sorted(unknown)[0]!r}; valid: stage1, rule, "
                "margin, jitter"
            )
        if not crop.get("stage1"):
            raise ConfigError("data.crop needs stage1=<the run dir of a finished stage-1 run>")
        spec = cls(
            str(crop["stage1"]),
            str(crop.get("rule", cls.rule)),
            float(crop.get("margin", cls.margin)),
            float(crop.get("jitter", cls.jitter)),
        )
        if not 0 <= spec.margin <= 3:
            raise ConfigError(f"data.crop.margin={spec.margin} must be in [0, 3]")
        if not 0 <= spec.jitter < 0.5:
            raise ConfigError(f"data.crop.jitter={spec.jitter} must be in [0, 0.5)")
        return spec


def region_box(mask: np.ndarray) -> Box | None:
    """The bounding box of a mask's nonzero pixels; None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def grow(box: Box, margin: float, shape: tuple[int, int]) -> tuple[Box, bool]:
    """The box grown by `margin` x its height on every side, clamped to the film; also
    whether the clamp cut it (a region near the film's edge)."""
    pad = margin * box.height
    want = (box.y0 - pad, box.x0 - pad, box.y1 + pad, box.x1 + pad)
    h, w = shape
    got = Box(
        max(0, int(np.floor(want[0]))),
        max(0, int(np.floor(want[1]))),
        min(h, int(np.ceil(want[2]))),
        min(w, int(np.ceil(want[3]))),
    )
    clamped = want[0] < 0 or want[1] < 0 or want[2] > h or want[3] > w
    return got, bool(clamped)


def jittered(box: Box, jitter: float, rng: np.random.Generator) -> Box:
    """The box moved by up to `jitter` of its size and scaled by up to 1 +- jitter."""
    cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
    scale = 1 + rng.uniform(-jitter, jitter)
    cy += rng.uniform(-jitter, jitter) * box.height
    cx += rng.uniform(-jitter, jitter) * box.width
    hh, hw = box.height * scale / 2, box.width * scale / 2
    return Box(round(cy - hh), round(cx - hw), max(round(cy - hh) + 1, round(cy + hh)),
               max(round(cx - hw) + 1, round(cx + hw)))  # fmt: skip


def _region(sample: Sample) -> np.ndarray:
    return (sample.label > 0) if sample.binary_label else region_mask(sample.label).astype(bool)


def _kept(sample: Sample, box: Box) -> float:
    """The share of the truth's region inside the box (1 where there is no region)."""
    region = _region(sample)
    total = int(region.sum())
    return 1.0 if total == 0 else float(box.crop(region).sum() / total)


@dataclass(frozen=True)
class Crop:
    """One film's box and its record in crops.csv."""

    box: Box
    source: str
    clamped: bool


def training_crop(sample: Sample, spec: CropSpec) -> Crop:
    """Around the truth, jittered with a generator seeded by the film's id."""
    truth = region_box(_region(sample))
    if truth is None:
        return Crop(Box(0, 0, *sample.image.shape[:2]), "whole", False)
    rng = np.random.default_rng(zlib.crc32(sample.id.encode()))
    box, clamped = grow(jittered(truth, spec.jitter, rng), spec.margin, sample.image.shape[:2])
    return Crop(box, "truth", clamped)


def predicted_crop(labels: np.ndarray, spec: CropSpec) -> Crop:
    """Around stage 1's predicted region (labels at the film's size); the whole film when
    stage 1 found nothing."""
    found = region_box(labels > 0)
    if found is None:
        return Crop(Box(0, 0, *labels.shape[:2]), "whole", False)
    box, clamped = grow(found, spec.margin, labels.shape[:2])
    return Crop(box, "stage1", clamped)


def check_stage1_run(crop: Mapping[str, Any] | None) -> CropSpec | None:
    """`data.crop` checked before any film is read: its options, and that stage 1 is a
    finished run with a selected ensemble (a sweep checks every job this way first)."""
    spec = CropSpec.from_config(None if crop is None else dict(crop))
    if spec is None:
        return None
    selection = Path(spec.stage1) / SELECTION
    if not selection.is_file():
        raise ConfigError(
            f"data.crop.stage1={spec.stage1} has no {SELECTION}: train stage 1 and run "
            "spineseg-ensemble on it first (spineseg-study does both when study.stage1 is set)"
        )
    return spec


def within_run(spec: CropSpec, recorded_run_dir: str | None, run_dir: Path) -> CropSpec:
    """A stage 1 kept inside the run directory (spineseg-study's `<run_dir>/stage1`) moves
    with it, so a cascade copied to another machine or folder still finds its stage 1."""
    return replace(spec, stage1=str(rebased(spec.stage1, recorded_run_dir, run_dir)))


def stage1_ensemble(spec: CropSpec, device: str = "cpu") -> Any:
    from spineseg.predict import load_ensemble

    ens = load_ensemble(spec.stage1, rule=spec.rule, device=device)
    if ens.stage1 is not None:
        raise ConfigError(f"data.crop.stage1={spec.stage1} is itself a cascade: use its stage 1")
    return ens


def predicted_crops(images: Sequence[np.ndarray], spec: CropSpec, batch: int = 8) -> list[Crop]:
    ens = stage1_ensemble(spec)
    out: list[Crop] = []
    for start in range(0, len(images), batch):
        for pred in ens.predict_batch(list(images[start : start + batch])):
            out.append(predicted_crop(pred.labels, spec))
    return out


def check_stage1_split(spec: CropSpec, assignment: Mapping[str, str]) -> None:
    """Stage 1 must have trained on exactly these training films: it must never have seen a
    film this run validates or tests on."""
    from spineseg.data.splits import read_splits_csv

    path = Path(spec.stage1) / "splits.csv"
    if not path.is_file():
        raise ConfigError(f"data.crop.stage1: {path} does not exist (is it a spineseg run?)")
    theirs = read_splits_csv(path)
    leaked = [i for i, s in assignment.items() if s != TRAIN and theirs.get(i) == TRAIN]
    if leaked:
        raise DataError(
            path,
            f"stage 1 trained on {len(leaked)} film(s) this run holds out (e.g. {leaked[0]!r}): "
            "train stage 1 with the same data and data.split_seed",
        )


def crop_all(
    samples: Sequence[Sample],
    splits: Sequence[str],
    spec: CropSpec,
    run_dir: str | None,
    dataset: str = "internal",
) -> list[Sample]:
    """Every sample cropped (see the module docstring), recorded in `<run_dir>/crops.csv`
    (`crops_external.csv` for the external dataset); a file already there for the same
    films and spec is reused, so all jobs agree."""
    key = f"{spec}"
    name = CROPS_CSV if dataset == "internal" else f"crops_{dataset}.csv"
    path = Path(run_dir) / name if run_dir else None
    if path is None:
        crops = _compute(samples, splits, spec)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".crops.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one job computes, the others wait and read
            crops = _read(path, key, [s.id for s in samples])
            if crops is None:
                crops = _compute(samples, splits, spec)
                _write(path, key, samples, splits, crops)
    whole = sum(c.source == "whole" for c, sp in zip(crops, splits, strict=True) if sp != TRAIN)
    if whole:
        log.warning("stage 1 found no region on %d held-out film(s): whole film used", whole)
    lost = [
        s.id
        for s, c, sp in zip(samples, crops, splits, strict=True)
        if sp != TRAIN and _kept(s, c.box) < 0.999
    ]
    if lost:
        log.warning(
            "the stage-1 box cuts part of the truth on %d held-out film(s) (e.g. %s): their "
            "Dice counts only what the box holds (crops.csv: truth_kept per film); "
            "spineseg-score scores the pasted-back masks against the whole films",
            len(lost), lost[0],
        )  # fmt: skip
    return [replace(s, image=c.box.crop(s.image).copy(), label=c.box.crop(s.label).copy(),
                    meta={**s.meta, "crop": c.box}) for s, c in zip(samples, crops, strict=True)]  # fmt: skip


def _compute(samples: Sequence[Sample], splits: Sequence[str], spec: CropSpec) -> list[Crop]:
    held = [k for k, sp in enumerate(splits) if sp != TRAIN]
    predicted = predicted_crops([samples[k].image for k in held], spec) if held else []
    crops: list[Crop | None] = [None] * len(samples)
    for k, c in zip(held, predicted, strict=True):
        crops[k] = c
    for k, s in enumerate(samples):
        if crops[k] is None:
            crops[k] = training_crop(s, spec)
    return crops  # type: ignore[return-value]


def _write(path: Path, key: str, samples, splits, crops: Sequence[Crop]) -> None:
    buf = io.StringIO()
    buf.write(f"# {key}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_COLUMNS)
    for s, sp, c in zip(samples, splits, crops, strict=True):
        b = c.box
        w.writerow([s.id, sp, c.source, b.y0, b.x0, b.y1, b.x1, *s.image.shape[:2],
                    int(c.clamped), f"{_kept(s, b):.4f}"])  # fmt: skip
    atomic_write_text(path, buf.getvalue())


def _read(path: Path, key: str, ids: Sequence[str]) -> list[Crop] | None:
    """The crops of a file written for the same spec and films, else None (recomputed)."""
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if not lines or lines[0] != f"# {key}":
        return None
    rows = {r["id"]: r for r in csv.DictReader(lines[1:])}
    if set(rows) != set(ids):
        return None
    boxes = [Box(*(int(rows[i][k]) for k in ("y0", "x0", "y1", "x1"))) for i in ids]
    return [
        Crop(box, rows[i]["source"], rows[i]["clamped"] == "1")
        for box, i in zip(boxes, ids, strict=True)
    ]
