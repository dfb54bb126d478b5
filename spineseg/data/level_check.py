"""Do a dataset's labels agree on the level? A patient's films, compared body by body.

A level error is only as real as the label it is measured against. When a patient has
several films (follow-ups), their labels name the same bodies, so the films can check each
other without an expert: each labelled vertebra is cut out of its film at the source's own
resolution (the body's minimal rotated rectangle, grown by a quarter, resampled to 40x56 and
standardised) and compared with the other film's bodies. If film b's labels sit s levels
lower along the spine than film a's, a's body v looks most like b's body v - s; the shift s
that maximises the mean normalised cross-correlation over the bodies both films label is the
pair's shift. Per patient, integer offsets (one per film, within two levels) that best
explain all its pairs are found by search; a film whose offset differs from the patient's
majority disagrees with the patient's other films. Two films that disagree cannot say which
one is off, only that one is: both are marked as not agreeing.

`spineseg-validate-data check_levels=true` runs it on any source whose masks label the
column (AASCE, the phantoms, a folder dataset declaring `levels`) and whose films name a
patient; `spineseg-score label_offsets=<csv>` then gives each rule's level-error rate on the
films whose labels agree. `benchmarks/label_consistency.py` measures that the check sees a
known shift and that its shifts are not noise (docs/real-films.md).
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from spineseg.data.sample import Sample
from spineseg.errors import DataError
from spineseg.names import LEVELS
from spineseg.utils.io import atomic_open

log = logging.getLogger(__name__)

PATCH = (40, 56)  # rows, cols of a body's patch; bodies are wider than tall on AP films
GROW = 1.25  # the patch takes in the endplates, pedicles and a little of what is around
MAX_OFFSET = 2  # a film's labels are searched within two levels of its patient's others
MIN_SHARED = 8  # bodies two films must both label at a shift for it to count
COLUMNS = ("id", "patient", "films", "offset", "agrees", "settled")  # the offsets CSV

Patches = dict[int, np.ndarray]  # level value -> standardised patch of that body


def body_corners(mask: np.ndarray) -> np.ndarray | None:
    """A body's minimal rotated rectangle as (top-left, top-right, bottom-left,
    bottom-right) in (x, y), its near-horizontal side pointing right; None if it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return None
    (cx, cy), _, _ = rect = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
    box = cv2.boxPoints(rect)
    e1, e2 = box[1] - box[0], box[2] - box[1]
    u, v = (e1, e2) if abs(e1[0]) >= abs(e2[0]) else (e2, e1)
    u = u if u[0] >= 0 else -u
    v = v if v[1] >= 0 else -v
    c = np.array([cx, cy], np.float32)
    return np.stack([c - u / 2 - v / 2, c + u / 2 - v / 2, c - u / 2 + v / 2, c + u / 2 + v / 2])


def body_patches(image: np.ndarray, label: np.ndarray) -> Patches:
    """Every labelled body of one film (level value -> standardised patch)."""
    film = image.astype(np.float32)
    rows, cols = PATCH
    target = np.float32([[0, 0], [cols, 0], [0, rows], [cols, rows]])
    out = {}
    for value, where in enumerate(ndimage.find_objects(label), start=1):
        if where is None:
            continue
        corners = body_corners(label[where] == value)
        if corners is None:
            continue
        corners += np.float32([where[1].start, where[0].start])
        centre = corners.mean(0)
        corners = centre + (corners - centre) * GROW
        warp = cv2.getPerspectiveTransform(corners.astype(np.float32), target)
        patch = cv2.warpPerspective(film, warp, (cols, rows), borderMode=cv2.BORDER_REFLECT)
        out[value] = (patch - patch.mean()) / (patch.std() + 1e-6)
    return out


def shift_scores(a: Patches, b: Patches) -> dict[int, float]:
    """For each shift s, the mean correlation of a's body v with b's body v - s over the
    bodies both label (-inf with fewer than MIN_SHARED): s > 0 when b's labels sit s levels
    lower along the spine than a's (b names Th8 the body a names Th9)."""
    out = {}
    for s in range(-2 * MAX_OFFSET, 2 * MAX_OFFSET + 1):
        shared = [v for v in a if v - s in b]
        out[s] = (
            float(np.mean([(a[v] * b[v - s]).mean() for v in shared]))
            if len(shared) >= MIN_SHARED
            else -np.inf
        )
    return out


def patient_offsets(scores: Mapping[tuple[int, int], dict[int, float]], n: int) -> np.ndarray:
    """Integer offsets o (o[0] = 0; how many levels lower a film's labels sit) maximising
    the sum over pairs (i, j) of their score at o[j] - o[i]: exhaustive for up to six
    films, coordinate ascent beyond."""

    def total(o) -> float:
        return sum(s[o[j] - o[i]] for (i, j), s in scores.items())

    values = range(-MAX_OFFSET, MAX_OFFSET + 1)
    if n <= 6:
        rest = max(itertools.product(values, repeat=n - 1), key=lambda t: total((0, *t)))
        return np.array((0, *rest))
    o = np.zeros(n, int)
    for _ in range(5):
        for i in range(1, n):
            o[i] = max(values, key=lambda v: total((*o[:i], v, *o[i + 1 :])))
    return o


def majority(o: np.ndarray) -> int:
    """The most common offset; the first film's where none repeats (two films that differ)."""
    values, counts = np.unique(o, return_counts=True)
    return int(values[np.argmax(counts)] if counts.max() > 1 else o[0])


def settled(o: np.ndarray) -> bool:
    """Whether more of the films share one offset than any other: only then can the check
    say which films are off (not for two films that differ, nor for a tie)."""
    counts = np.sort(np.unique(o, return_counts=True)[1])[::-1]
    return len(counts) == 1 or counts[0] > counts[1]


def relative(o: np.ndarray) -> np.ndarray:
    """Offsets against the patient's majority (for two films: against the first)."""
    return o - majority(o)


def check_patient(patches: Sequence[Patches]) -> tuple[np.ndarray, dict]:
    """(each film's offset against its patient's majority, the pairs' scores)."""
    scores = {
        (i, j): shift_scores(patches[i], patches[j])
        for i, j in itertools.combinations(range(len(patches)), 2)
    }
    return relative(patient_offsets(scores, len(patches))), scores


# ----------------------------------------------------------------------------- a dataset


@dataclass(frozen=True)
class FilmCheck:
    """One film's verdict: how many levels lower its labels sit than its patient's majority
    (for two films: than the first), whether it agrees with the patient's others, and
    whether the patient's films have a majority at all (without one, none agrees)."""

    id: str
    patient: str
    films: int
    offset: int
    agrees: bool
    settled: bool


@dataclass
class LevelCheck:
    films: dict[str, FilmCheck]  # the films of patients with two or more
    pair_shift: dict[tuple[str, int, int], int]  # (patient, i, j) -> best shift, i < j
    unchecked: int  # films of patients with one film


#: what the check says of a film's labels -> how tables name the films it says it of
AGREEMENT = {
    "agree": "whose labels agree with their patient's others",
    "differ": "whose labels differ from their patient's others",
    "unchecked": "of patients with one film (not checked)",
}


def verdict(f: FilmCheck) -> str:
    """The check's word on one film, as a warning or a review sheet says it."""
    if f.agrees:
        return "labels agree with the patient's other films"
    if f.settled:
        n, side = abs(f.offset), "lower" if f.offset > 0 else "higher"
        return f"labels {n} level{'s' if n > 1 else ''} {side} than the patient's other films"
    if f.films == 2:
        return (
            "labels a level or more off the patient's other film (which of the two, the check "
            "cannot say)"
        )
    return (
        "labels of the patient's films disagree, with no majority (which are off, the check "
        "cannot say)"
    )


def agreement(films: Mapping[str, FilmCheck], film_id: str) -> str:
    """A key of AGREEMENT: whether the check found the film's labels agreeing."""
    if film_id not in films:
        return "unchecked"
    return "agree" if films[film_id].agrees else "differ"


def patient_groups(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """The patients with two or more films, each's films in id order."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.patient_id].append(s)
    return {p: sorted(g, key=lambda s: s.id) for p, g in groups.items() if len(g) > 1}


def group_patches(groups: Mapping[str, Sequence[Sample]]) -> dict[str, list[Patches]]:
    """Every film's body patches, by patient; refuses masks that label too few bodies."""
    patches = {p: [body_patches(s.image, s.label) for s in g] for p, g in groups.items()}
    most = max((len(b) for g in patches.values() for b in g), default=0)
    if most < MIN_SHARED:
        raise DataError(
            None,
            f"the films label at most {most} vertebrae; checking levels across films needs "
            f"{MIN_SHARED} or more (a source that labels the column, e.g. AASCE, or a folder "
            "dataset declaring data.source_kwargs.levels)",
        )
    return patches


def check_levels(
    samples: Sequence[Sample], patches: Mapping[str, Sequence[Patches]] | None = None
) -> LevelCheck:
    """Every film of a patient with several, checked against that patient's other films."""
    groups = patient_groups(samples)
    if not groups:
        raise DataError(None, "no patient has two films: the labels cannot be checked this way")
    patches = group_patches(groups) if patches is None else patches
    films: dict[str, FilmCheck] = {}
    pair_shift: dict[tuple[str, int, int], int] = {}
    for p, g in groups.items():
        offsets, scores = check_patient(patches[p])
        for (i, j), s in scores.items():
            pair_shift[p, i, j] = max(s, key=s.get)
        ruled = settled(offsets)  # without a majority (two films that differ), none agrees
        for s, o in zip(g, offsets, strict=True):
            films[s.id] = FilmCheck(s.id, p, len(g), int(o), bool(o == 0 and ruled), ruled)
    return LevelCheck(films, pair_shift, len(samples) - len(films))


def write_offsets(path: str | Path, check: LevelCheck) -> None:
    """Every checked film's offset and verdict as CSV, atomically."""
    with atomic_open(Path(path), "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for f in sorted(check.films.values(), key=lambda f: f.id):
            writer.writerow([f.id, f.patient, f.films, f.offset, int(f.agrees), int(f.settled)])


def _film_check(row: Mapping[str, str]) -> FilmCheck:
    return FilmCheck(
        row["id"],
        row["patient"],
        int(row["films"]),
        int(row["offset"]),
        row["agrees"] == "1",
        row["settled"] == "1",
    )


def read_offsets(path: str | Path) -> dict[str, FilmCheck]:
    """A CSV written by `write_offsets`, by film id."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "not found: write it with spineseg-validate-data level_offsets=<csv>")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(path, f"not a level-offsets CSV: no column {missing[0]!r}")
        try:
            return {r["id"]: _film_check(r) for r in reader}
        except ValueError as err:
            raise DataError(path, f"line {reader.line_num}: {err}") from None


# ----------------------------------------------------------------------------- corrections


def read_corrections(path: str | Path) -> dict[str, int]:
    """Film id -> how many levels lower its labels sit than the anatomy, from a CSV with an
    `id` column and either `expert_offset` (a `review.csv` a reader filled in: blank rows are
    left as labelled) or `offset` (a `level_offsets` CSV: only films whose patient has a
    majority, `settled` 1, since the others' offsets say nothing about which film is off)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            path,
            "level corrections not found: write them with spineseg-validate-data "
            "review=<dir> (then fill expert_offset) or level_offsets=<csv>",
        )
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        column = next((c for c in ("expert_offset", "offset") if c in fields), None)
        if "id" not in fields or column is None:
            raise DataError(
                path, "level corrections need an id and an expert_offset or offset column"
            )
        out: dict[str, int] = {}
        for row in reader:
            value = (row[column] or "").strip()
            if not value or (column == "offset" and row.get("settled", "1") != "1"):
                continue
            try:
                out[row["id"]] = int(value)
            except ValueError:
                raise DataError(
                    path,
                    f"line {reader.line_num}: {column}={value!r} is not a whole number of levels",
                ) from None
    return out


def apply_corrections(
    samples: Sequence[Sample], corrections: Mapping[str, int], path: str | Path
) -> list[Sample]:
    """Every listed film's vertebrae renamed by its offset (labels that sit one level lower
    than the anatomy: each body's name moves one level down, Th8 becomes Th9); a body renamed
    past the last level a label map can name is dropped. Nothing else changes."""
    ids = {s.id for s in samples}
    listed = [i for i in corrections if i in ids]
    if corrections and not listed:
        raise DataError(
            path, f"none of its {len(corrections)} films is in this source (first id: "
            f"{next(iter(corrections))!r}); are these the corrections of another dataset?",
        )  # fmt: skip
    if len(listed) < len(corrections):
        log.warning("%s: %d of its films are not in this source; left out",
                    path, len(corrections) - len(listed))  # fmt: skip
    out = []
    for s in samples:
        k = corrections.get(s.id, 0)
        if k and s.binary_label:
            raise DataError(s.source_path or s.id, "a region-only mask cannot be renamed by level")
        if k:
            shifted = s.label.astype(np.int16) + k
            keep = (s.label > 0) & (shifted >= 1) & (shifted <= len(LEVELS))
            label = np.where(keep, shifted, 0).astype(np.uint8)
            s = replace(s, label=label, meta={**s.meta, "level_correction": k})
        out.append(s)
    return out
