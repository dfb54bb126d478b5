"""Do a dataset's labels agree on the level? A patient's films, compared body by body.

The check itself is the package's (`spineseg/data/level_check.py`, run on any dataset with
`spineseg-validate-data check_levels=true`): every labelled vertebra of a patient's films is
compared with the bodies of the patient's other films, and per patient one integer offset
per film explains all the pairs. This script measures whether that check can be trusted.

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
labels agree or differ, and whether its errors on films whose labels agree cluster by
patient (`patient_clustering`). `--leave-out OTHER_RUN` drops the films OTHER_RUN keeps for
its test split (a run on another split, scored on films the main split tests on). A model
that places the region where the patient's other films' labels put it follows the label
shift (positive r, slope near 1). `--against OTHER_RUN` compares the two runs on the same
films (level errors, paired Dice difference). `--out CSV` writes every film's verdict, as
`spineseg-validate-data level_offsets=CSV` does.

The comparison needs a source that labels more than the four target vertebrae and gives
films a patient (AASCE: the number in its file names).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from common import machine
from hydra.errors import HydraException
from level_baseline import _line, _rate

from spineseg.config import build
from spineseg.data.level_check import (
    AGREEMENT,
    FilmCheck,
    agreement,
    check_levels,
    check_patient,
    group_patches,
    majority,
    patient_groups,
    write_offsets,
)
from spineseg.data.sources import build_spec
from spineseg.data.splits import read_splits_csv
from spineseg.ensemble.metrics import LEVEL_ERROR_PITCHES
from spineseg.ensemble.stats import proportion_ci
from spineseg.errors import SpinesegError
from spineseg.names import STORED_SPLITS, TEST


def closure(pair_shift: dict[tuple[str, int, int], int], patients: dict[str, int]) -> float:
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


def soft_scores(run_dir: Path, splits: list[str], leave_out: set[str]):
    """The soft vote's per-film rows (`dice`, `level_error`, `level_offset`, by id) of a
    scored run (`spineseg-score`), over the given splits, less the films in `leave_out`."""
    import pandas as pd

    parts = []
    for split in splits:
        path = run_dir / "film_scores" / split / "per_image.csv"
        if not path.is_file():
            sys.exit(
                f"error: {path} not found: run `spineseg-score run_dir={run_dir} split={split}`"
            )
        table = pd.read_csv(path)
        parts.append(table[(table["method"] == "soft") & ~table["id"].isin(leave_out)])
    return pd.concat(parts).set_index("id")


def run_offsets(run_dir: Path, splits: list[str], leave_out: set[str]) -> dict[str, float]:
    """The soft vote's per-film level offsets (finite ones: a film with no prediction has
    none) of a scored run."""
    soft = soft_scores(run_dir, splits, leave_out)["level_offset"]
    return {f: float(o) for f, o in soft.items() if np.isfinite(o)}


def compare_runs(run: Path, other: Path, splits: list[str], leave_out: set[str]) -> str:
    """Two scored runs on the same films: level errors of each and of both, and the paired
    Dice difference (bootstrap 95% CI over films, as `spineseg-score against=` gives it)."""
    from spineseg.report.film_scores import paired

    a, b = soft_scores(run, splits, leave_out), soft_scores(other, splits, leave_out)
    if set(a.index) != set(b.index):
        sys.exit(f"error: {run} and {other} score different films; --against needs the same")
    b = b.loc[a.index]
    r = paired(a, b)
    return (
        f"{run} against {other} on {r['n']} films: level errors {r['level_errors']} against "
        f"{r['other_level_errors']} ({r['level_errors_both']} in both); Dice "
        f"{a['dice'].mean():.3f} against {b['dice'].mean():.3f}, paired {r['dice_diff']:+.3f} "
        f"[{r['dice_diff_ci_low']:+.3f}, {r['dice_diff_ci_high']:+.3f}]"
    )


def held_out_test(run_dir: Path) -> set[str]:
    """The films a run keeps for its test split (its splits.csv)."""
    path = run_dir / "splits.csv"
    if not path.is_file():
        sys.exit(f"error: {path} not found: --leave-out takes a run directory")
    return {film for film, split in read_splits_csv(path).items() if split == TEST}


def compare_run(run: dict[str, float], films: dict[str, FilmCheck], where: str) -> list[str]:
    """A run's per-film level offsets against the labels' offsets, pair by pair. Where
    film b's labels sit one level lower than a's, a run that places the region where a's
    labels put it is half a pitch or more too high on b: its offset (positive = too low)
    falls by one from a to b, so the expected difference is minus the labels'."""
    by_patient = defaultdict(list)
    for film, check in films.items():
        if film in run:
            by_patient[check.patient].append((check.offset, run[film]))
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
    for key in ("unchecked", "agree", "differ"):
        ids = [f for f in run if agreement(films, f) == key]
        if ids:
            lines.append(_line(f"  films {AGREEMENT[key]}", _rate(np.array([run[f] for f in ids]))))
    return lines + patient_clustering(run, films)


def patient_clustering(
    run: dict[str, float], films: dict[str, FilmCheck], n_shuffles: int = 20000
) -> list[str]:
    """Whether the run's level errors on films whose labels agree cluster by patient: pairs
    of one patient's agreeing films both wrong, against the same errors shuffled across
    those films (patients kept), and which way the errors point where the labels are not
    known to be off."""
    groups = defaultdict(list)
    for f, offset in run.items():
        if agreement(films, f) == "agree":
            groups[films[f].patient].append(offset)
    groups = {p: np.array(o) for p, o in groups.items() if len(o) > 1}
    if not groups:
        return []
    wrong = np.concatenate([np.abs(o) > LEVEL_ERROR_PITCHES for o in groups.values()])
    sizes = np.array([len(o) for o in groups.values()])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def both(flags: np.ndarray) -> int:
        c = np.add.reduceat(flags.astype(int), starts)
        return int((c * (c - 1) // 2).sum())

    rng = np.random.default_rng(0)
    seen = both(wrong)
    null = np.array([both(rng.permutation(wrong)) for _ in range(n_shuffles)])
    counts = np.add.reduceat(wrong.astype(int), starts)
    same = 0  # pairs of errors that point the same way
    for o in groups.values():
        up, down = int((o < -LEVEL_ERROR_PITCHES).sum()), int((o > LEVEL_ERROR_PITCHES).sum())
        same += up * (up - 1) // 2 + down * (down - 1) // 2
    loose = np.array([o for f, o in run.items() if agreement(films, f) != "differ"])
    loose = loose[np.abs(loose) > LEVEL_ERROR_PITCHES]
    return [
        f"  agreeing films of one patient ({len(groups)} patients, {int(sizes.sum())} films, "
        f"{int(wrong.sum())} level errors): {seen} pairs both wrong ({same} the same way), "
        f"{null.mean():.1f} with the errors shuffled across these films (p = "
        f"{(null >= seen).mean():.3f}); patients all right {int((counts == 0).sum())}, all "
        f"wrong {int((counts == sizes).sum())}, mixed {int(((counts > 0) & (counts < sizes)).sum())}",
        f"  level errors on films whose labels agree or cannot be checked: {int((loose < 0).sum())}"
        f" of {len(loose)} put the region above the labels' (negative offset)",
    ]


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
    ap.add_argument(
        "--against", type=Path, help="with --run: another scored run, compared on the same films"
    )
    ap.add_argument("--out", type=Path, help="write every film's offset to this CSV")
    args = ap.parse_args()
    try:
        dm = build("data", args.overrides, run_dir=None)
        samples = build_spec(dm.internal_spec)
    except (HydraException, SpinesegError) as err:
        sys.exit(f"error: {str(err).splitlines()[0]}")
    groups = patient_groups(samples)
    try:
        patches = group_patches(groups)
        check = check_levels(samples, patches)
    except SpinesegError as err:
        sys.exit(f"error: {err}")
    films, rng = check.films, np.random.default_rng(0)
    seen = hit = 0
    for p, g in groups.items():
        offsets = np.array([films[s.id].offset for s in g])
        # a known shift: one film's labels renamed one level down
        k = int(rng.integers(len(g)))
        moved = [dict(b) for b in patches[p]]
        moved[k] = {v - 1: b for v, b in patches[p][k].items() if v > 1}
        change = check_patient(moved)[0] - offsets
        change -= majority(np.delete(change, k))
        seen += 1
        hit += change[k] == 1 and not np.delete(change, k).any()
    sizes = {p: len(g) for p, g in groups.items()}
    pair_shift = check.pair_shift
    shuffled = dict(zip(pair_shift, rng.permutation(list(pair_shift.values())), strict=True))
    off = np.array([f.offset for f in films.values()])
    disagree = proportion_ci(
        np.array([any(films[s.id].offset for s in g) for g in groups.values()], float)
    )
    three = [s.id for g in groups.values() if len(g) > 2 for s in g]
    print(f"# {machine()}")
    print(
        f"{len(groups)} patients with two or more films ({len(films)} films; "
        f"{check.unchecked} films of patients with one are not checked)"
    )
    print(
        f"patients whose films' labels disagree by a level or more: "
        f"{round(disagree['rate'] * disagree['n'])} of {disagree['n']} "
        f"({100 * disagree['rate']:.1f}% [{100 * disagree['ci_low']:.1f}, "
        f"{100 * disagree['ci_high']:.1f}])"
    )
    print(
        f"films off their patient's majority (patients with three or more films): "
        f"{sum(films[f].offset != 0 for f in three)} of {len(three)}; offsets "
        + ", ".join(f"{v:+d}: {int((off == v).sum())}" for v in np.unique(off))
    )
    print(f"a known one-level shift of one film per patient found on {hit} of {seen} patients")
    print(
        f"pairwise shifts that add up around three films of one patient: "
        f"{100 * closure(pair_shift, sizes):.0f}% of the triples with any shift, "
        f"{100 * closure(shuffled, sizes):.0f}% with the shifts shuffled across pairs"
    )
    if args.out is not None:
        write_offsets(args.out, check)
    if args.run is not None:
        leave_out = held_out_test(args.leave_out) if args.leave_out is not None else set()
        run = run_offsets(args.run, args.split, leave_out)
        print("\n".join(compare_run(run, films, f"{args.run} ({', '.join(args.split)})")))
        if args.against is not None:
            print(compare_runs(args.run, args.against, args.split, leave_out))


if __name__ == "__main__":
    main()
