"""Patient-level, seeded train/val/test splits, written as `splits.csv` and reused on resume."""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spineseg.errors import ConfigError, DataError
from spineseg.names import DATA_SPLITS as SPLITS
from spineseg.utils.io import atomic_write_text


def split_by_patient(
    ids: Sequence[str],
    patient_ids: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 42,
    forced: Sequence[str | None] | None = None,
) -> dict[str, str]:
    """Assign every id to train/val/test so that no patient spans two splits.

    Patients are shuffled by `seed` and dealt, largest film count first, to the split that
    is furthest below its target share of films; with one film per patient this gives the
    paper's 128/18/37 for 183 films. Films with a `forced` split (e.g. from a manifest)
    keep it, and pull their patient's other films with them.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
        raise ConfigError(
            f"fractions {list(fractions)} must be three non-negative numbers summing to 1"
        )
    if len(ids) != len(patient_ids):
        raise ConfigError("ids and patient_ids differ in length")
    forced = list(forced) if forced is not None else [None] * len(ids)
    films: dict[str, list[str]] = defaultdict(list)
    patient_forced: dict[str, str] = {}
    for i, p, f in zip(ids, patient_ids, forced, strict=True):
        films[p].append(i)
        if f is not None:
            if f not in SPLITS:
                raise DataError(None, f"film {i!r}: split {f!r} is not one of {', '.join(SPLITS)}")
            if patient_forced.setdefault(p, f) != f:
                raise DataError(
                    None, f"patient {p!r} is forced into two splits ({patient_forced[p]}, {f})"
                )
    counts = Counter()
    assignment: dict[str, str] = {}
    for p, s in patient_forced.items():
        for i in films[p]:
            assignment[i] = s
        counts[s] += len(films[p])
    free = sorted(p for p in films if p not in patient_forced)
    rng = np.random.default_rng(seed)
    order = [free[k] for k in rng.permutation(len(free))]
    order.sort(key=lambda p: -len(films[p]))  # stable: big patients first, shuffled within size
    total = len(ids)
    targets = [f * total for f in fractions]
    for p in order:
        deficits = [targets[k] - counts[s] for k, s in enumerate(SPLITS)]
        s = SPLITS[int(np.argmax(deficits))]
        for i in films[p]:
            assignment[i] = s
        counts[s] += len(films[p])
    return {i: assignment[i] for i in ids}


def write_splits_csv(
    path: str | Path, assignment: dict[str, str], patients: dict[str, str]
) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "patient_id", "split"])
    for i, s in assignment.items():
        writer.writerow([i, patients[i], s])
    atomic_write_text(path, buf.getvalue())


def read_splits_csv(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise DataError(path, f"cannot read splits ({err})") from err
    if not rows or not {"id", "split"} <= set(rows[0]):
        raise DataError(path, "expected columns id, patient_id, split")
    return {r["id"]: r["split"] for r in rows}


def check_disjoint(assignment: dict[str, str], patients: dict[str, str]) -> None:
    """Raise if any patient has films in two splits (a leak from train into test)."""
    seen: dict[str, str] = {}
    for i, s in assignment.items():
        p = patients[i]
        if seen.setdefault(p, s) != s:
            raise DataError(None, f"patient {p!r} appears in both {seen[p]} and {s}")
