"""Do a dataset's labels agree on the level? A patient's films, compared body by body.

A level error is only as real as the label it is measured against. When a patient has
several films (follow-ups), their labels name the same bodies, so the films can be checked
against each other without an expert: each labelled vertebra is cut out of its film at the
source's own resolution (the body's minimal rotated rectangle, grown by a quarter, resampled
to 40x56 and standardised) and compared with the other film's bodies. If film b's labels
sit s levels lower along the spine than film a's, a's body v looks most like b's body
v - s; the shift s that maximises the mean normalised cross-correlation over the bodies
both films label is the pair's shift. Per patient, integer offsets (one per film, within
two levels) that best explain all its pairs are found by search; a film whose offset
differs from the patient's majority disagrees with the patient's other films. A patient with
two films that disagree cannot say which one is off, only that one is.

The script checks that the method can see a shift: it renames one film's labels per
patient one level down (its second body becomes its first) and counts how often the
offsets move by exactly that. And it checks that the pairwise shifts are not noise: if
each film's labels carry an offset, the shifts add up around three films of one patient
(s_ab + s_bc = s_ac), far more often than the same shifts shuffled across pairs do.

    uv run python benchmarks/label_consistency.py data=aasce data.root=/path/to/boostnet_labeldata

`--run RUN_DIR --split val [test]` sets a scored run's per-film level offsets (the soft
vote's `level_offset` in `film_scores/<split>/per_image.csv`) beside the label shifts: for
every pair of films of one patient in those splits, the difference of the run's offsets
against the difference of the labels' offsets, and the run's level-error rate on films whose
labels agree or differ. `--leave-out OTHER_RUN` drops the films OTHER_RUN keeps for its test
split (a run on another split, scored on films the main split tests on). A model that places the region where the patient's
other films' labels put it follows the label shift (positive r, slope near 1). `--out CSV`
writes every film's offset.

The comparison needs a source that labels more than the four target vertebrae and gives
films a patient (AASCE: the number in its file names).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from common import machine
from hydra.errors import HydraException
from level_baseline import _line, _rate
from scipy import ndimage

from spineseg.config import build
from spineseg.data.sources import build_spec
from spineseg.data.splits import read_splits_csv
from spineseg.ensemble.stats import proportion_ci
from spineseg.errors import SpinesegError
from spineseg.names import STORED_SPLITS, TEST
from spineseg.utils.io import atomic_open

PATCH = (40, 56)  # rows, cols of a body's patch; bodies are wider than tall on AP films
GROW = 1.25  # the patch takes in the endplates, pedicles and a little of what is around
MAX_OFFSET = 2  # a film's labels are searched within two levels of its patient's others
MIN_SHARED = 8  # bodies two films must both label at a shift for it to count


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


def body_patches(image: np.ndarray, label: np.ndarray) -> dict[int, np.ndarray]:
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


def shift_scores(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[int, float]:
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


def patient_offsets(scores: dict[tuple[int, int], dict[int, float]], n: int) -> np.ndarray:
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


def relative(o: np.ndarray) -> np.ndarray:
    """Offsets against the patient's majority (for two films: against the first)."""
    return o - majority(o)


def check_patient(patches: list[dict[int, np.ndarray]]) -> tuple[np.ndarray, dict]:
    """(each film's offset against its patient's majority, the pairs' scores)."""
    scores = {
        (i, j): shift_scores(patches[i], patches[j])
        for i, j in itertools.combinations(range(len(patches)), 2)
    }
    return relative(patient_offsets(scores, len(patches))), scores


def closure(pair_shift: dict[tuple[int, int, int], int], patients: dict[int, int]) -> float:
    """The share of a patient's film triples with any nonzero pairwise shift whose shifts
    add up (s_ab + s_bc = s_ac); pair_shift is keyed by (patient, i, j), i < j."""
    hits = total = 0
    for p, n in patients.items():
        for i, j, k in itertools.combinations(range(n), 3):
            ab, bc, ac = pair_shift[p, i, j], pair_shift[p, j, k], pair_shift[p, i, k]
            if ab or bc or ac:
                total += 1
                hits += ab + bc == ac
    return hits / total if total else float("nan")


def run_offsets(run_dir: Path, splits: list[str], leave_out: set[str]) -> dict[str, float]:
    """The soft vote's per-film level offsets of a scored run (`spineseg-score`), over the
    given splits, less the films in `leave_out`."""
    import pandas as pd

    out = {}
    for split in splits:
        path = run_dir / "film_scores" / split / "per_image.csv"
        if not path.is_file():
            sys.exit(
                f"error: {path} not found: run `spineseg-score run_dir={run_dir} split={split}`"
            )
        table = pd.read_csv(path)
        soft = table[table["method"] == "soft"].set_index("id")["level_offset"]
        out.update({f: float(o) for f, o in soft.items() if f not in leave_out and np.isfinite(o)})
    return out


def held_out_test(run_dir: Path) -> set[str]:
    """The films a run keeps for its test split (its splits.csv)."""
    path = run_dir / "splits.csv"
    if not path.is_file():
        sys.exit(f"error: {path} not found: --leave-out takes a run directory")
    return {film for film, split in read_splits_csv(path).items() if split == TEST}


def compare_run(
    run: dict[str, float], films: dict[str, tuple[str, int, bool]], where: str
) -> list[str]:
    """A run's per-film level offsets against the labels' offsets, pair by pair. Where
    film b's labels sit one level lower than a's, a run that places the region where a's
    labels put it is half a pitch or more too high on b: its offset (positive = too low)
    falls by one from a to b, so the expected difference is minus the labels'."""
    by_patient = defaultdict(list)
    for film, (patient, offset, _) in films.items():
        if film in run:
            by_patient[patient].append((offset, run[film]))
    label_diff, run_diff = [], []
    for pairs in by_patient.values():
        for (la, ra), (lb, rb) in itertools.combinations(pairs, 2):
            label_diff.append(la - lb)
            run_diff.append(rb - ra)
    if len(label_diff) < 3:
        sys.exit(
            f"error: {where} scores {len(label_diff)} pairs of films of one patient; "
            "is it a run on the same data, with several films per patient in those splits?"
        )
    x, y = np.array(label_diff, float), np.array(run_diff)
    shifted = x != 0
    lines = [
        f"{where} (soft vote): {len(run)} films, {len(x)} pairs of films of one patient, "
        f"{int(shifted.sum())} whose labels disagree",
        f"  run's offset difference vs minus the labels' offset difference: Pearson r "
        f"{np.corrcoef(x, y)[0, 1]:.2f}, slope {np.polyfit(x, y, 1)[0]:.2f}",
    ]
    if shifted.any():
        follows = np.sign(y[shifted]) == np.sign(x[shifted])
        lines.append(
            f"  on the disagreeing pairs the run moves with the labels' shift on "
            f"{int(follows.sum())} of {int(shifted.sum())}"
        )
    groups = {
        "of patients with one film (not checked)": [f for f in run if f not in films],
        "whose labels agree with their patient's others": [
            f for f in run if f in films and films[f][2]
        ],
        "whose labels differ from their patient's others": [
            f for f in run if f in films and not films[f][2]
        ],
    }
    for what, ids in groups.items():
        if ids:
            lines.append(_line(f"  films {what}", _rate(np.array([run[f] for f in ids]))))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="spineseg-train data overrides")
    ap.add_argument("--run", type=Path, help="a scored run to set beside the label shifts")
    ap.add_argument(
        "--split",
        nargs="+",
        default=["val"],
        choices=[s for s in STORED_SPLITS if s != "external"],
        help="the run's splits to read (film_scores/<split>/)",
    )
    ap.add_argument(
        "--leave-out",
        type=Path,
        help="a run directory whose test films are left out of --run's, so that a test split "
        "read once stays unread",
    )
    ap.add_argument("--out", type=Path, help="write every film's offset to this CSV")
    args = ap.parse_args()
    try:
        dm = build("data", args.overrides, run_dir=None)
        samples = build_spec(dm.internal_spec)
    except (HydraException, SpinesegError) as err:
        sys.exit(f"error: {str(err).splitlines()[0]}")
    groups = defaultdict(list)
    for s in samples:
        groups[s.patient_id].append(s)
    groups = {p: sorted(g, key=lambda s: s.id) for p, g in groups.items() if len(g) > 1}
    if not groups:
        sys.exit("error: no patient has two films in this source; nothing to compare")
    patches = {p: [body_patches(s.image, s.label) for s in g] for p, g in groups.items()}
    most = max(len(b) for g in patches.values() for b in g)
    if most < MIN_SHARED:
        sys.exit(
            f"error: the films label at most {most} vertebrae; comparing levels needs "
            f"{MIN_SHARED}: a source that labels the whole column"
        )
    films, pair_shift, rng = {}, {}, np.random.default_rng(0)
    seen = hit = 0
    for p, g in groups.items():
        offsets, scores = check_patient(patches[p])
        for (i, j), s in scores.items():
            pair_shift[p, i, j] = max(s, key=s.get)
        odd = offsets.any() and len(g) == 2  # two films that disagree: either may be off
        films.update(
            {s.id: (p, int(o), o == 0 and not odd) for s, o in zip(g, offsets, strict=True)}
        )
        # a known shift: one film's labels renamed one level down
        k = int(rng.integers(len(g)))
        moved = [dict(b) for b in patches[p]]
        moved[k] = {v - 1: b for v, b in patches[p][k].items() if v > 1}
        change = check_patient(moved)[0] - offsets
        change -= majority(np.delete(change, k))
        seen += 1
        hit += change[k] == 1 and not np.delete(change, k).any()
    sizes = {p: len(g) for p, g in groups.items()}
    shuffled = dict(zip(pair_shift, rng.permutation(list(pair_shift.values())), strict=True))
    off = np.array([o for _, o, _ in films.values()])
    disagree = proportion_ci(
        np.array([any(films[s.id][1] for s in g) for g in groups.values()], float)
    )
    three = [s.id for g in groups.values() if len(g) > 2 for s in g]
    print(f"# {machine()}")
    print(
        f"{len(groups)} patients with two or more films ({len(films)} films; "
        f"{len(samples) - len(films)} films of patients with one are not checked)"
    )
    print(
        f"patients whose films' labels disagree by a level or more: "
        f"{round(disagree['rate'] * disagree['n'])} of {disagree['n']} "
        f"({100 * disagree['rate']:.1f}% [{100 * disagree['ci_low']:.1f}, "
        f"{100 * disagree['ci_high']:.1f}])"
    )
    print(
        f"films off their patient's majority (patients with three or more films): "
        f"{sum(films[f][1] != 0 for f in three)} of {len(three)}; offsets "
        + ", ".join(f"{v:+d}: {int((off == v).sum())}" for v in np.unique(off))
    )
    print(f"a known one-level shift of one film per patient found on {hit} of {seen} patients")
    print(
        f"pairwise shifts that add up around three films of one patient: "
        f"{100 * closure(pair_shift, sizes):.0f}% of the triples with any shift, "
        f"{100 * closure(shuffled, sizes):.0f}% with the shifts shuffled across pairs"
    )
    if args.out is not None:
        with atomic_open(args.out, "w") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["id", "patient", "films", "offset", "agrees"])
            for film, (p, o, ok) in sorted(films.items()):
                writer.writerow([film, p, sizes[p], o, int(ok)])
    if args.run is not None:
        leave_out = held_out_test(args.leave_out) if args.leave_out is not None else set()
        run = run_offsets(args.run, args.split, leave_out)
        print("\n".join(compare_run(run, films, f"{args.run} ({', '.join(args.split)})")))


if __name__ == "__main__":
    main()
