"""Data validation report: what a dataset holds and everything wrong with it, in one pass.

Pure functions over loaded samples (+ the sources' skipped list) so the CLI, tests and
notebooks share them. Errors are what would break training or bias evaluation (unreadable
files, empty masks, patient leakage); warnings are worth a look but not fatal.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from spineseg.data.sample import Sample
from spineseg.errors import DataError
from spineseg.names import LEVELS, TARGET_LEVELS, TARGET_VALUES

if TYPE_CHECKING:
    from spineseg.data.level_check import LevelCheck


def label_name(value: int) -> str:
    """A level value's vertebra (0 = background)."""
    return "background" if value == 0 else LEVELS[value - 1] if value <= len(LEVELS) else "?"


@dataclass(frozen=True)
class Issue:
    level: str  # "error" | "warning"
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


@dataclass
class Report:
    name: str
    n_films: int = 0
    n_patients: int = 0
    n_skipped: int = 0
    heights: tuple[int, int, int] | None = None  # min, median, max
    widths: tuple[int, int, int] | None = None
    bit_depths: dict[str, int] = field(default_factory=dict)
    #: label (background, region, or a vertebra such as Th8) -> films containing it
    label_values: dict[str, int] = field(default_factory=dict)
    label_modes: dict[str, int] = field(default_factory=dict)  # binary / vertebrae -> films
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> films, patients
    issues: list[Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what an optional check found, in a line

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def pixel_hash(image: np.ndarray) -> str:
    """Content hash of the pixels (shape and dtype included): same film saved twice."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def build_report(
    samples: list[Sample], skipped: Iterable[tuple[str, str]] = (), name: str = "data"
) -> Report:
    """Counts, geometry, labels and every problem found in one dataset."""
    skipped = list(skipped)
    report = Report(name=name, n_films=len(samples), n_skipped=len(skipped))
    report.issues += [Issue("error", path, f"skipped: {problem}") for path, problem in skipped]
    report.n_patients = len({s.patient_id for s in samples})
    if samples:
        heights = [s.image.shape[0] for s in samples]
        widths = [s.image.shape[1] for s in samples]
        report.heights = _spread(heights)
        report.widths = _spread(widths)
    report.bit_depths = dict(Counter(str(s.image.dtype) for s in samples))
    values: Counter[tuple[int, str]] = Counter()
    for sample in samples:
        report.issues += _sample_issues(sample, values)
    report.label_values = {name: n for (_, name), n in sorted(values.items())}
    modes = Counter("binary" if s.binary_label else "vertebrae" for s in samples)
    report.label_modes = dict(modes)
    if len(modes) > 1:
        report.issues.append(
            Issue(
                "warning",
                "",
                f"mixed masks: {modes['binary']} binary and {modes['vertebrae']} per-vertebra; "
                "target=vertebrae needs per-vertebra masks for every film",
            )
        )
    report.issues += _duplicate_ids(samples)
    report.issues += _duplicate_images(samples)
    report.splits, split_issues = _splits(samples)
    report.issues += split_issues
    return report


def cross_check(main: list[Sample], external: list[Sample]) -> list[Issue]:
    """An external test set must share no patient and no film with the main dataset."""
    issues = []
    main_patients = {s.patient_id for s in main}
    shared = sorted({s.patient_id for s in external} & main_patients)
    if shared:
        shown = ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else "")
        issues.append(
            Issue("error", "", f"{len(shared)} patient(s) in both data and external: {shown}")
        )
    main_hashes = {pixel_hash(s.image): s for s in main}
    for sample in external:
        twin = main_hashes.get(pixel_hash(sample.image))
        if twin is not None:
            issues.append(
                Issue(
                    "error",
                    sample.source_path or sample.id,
                    f"identical pixels to {twin.source_path or twin.id} of the main dataset",
                )
            )
    return issues


def level_issues(samples: list[Sample]) -> tuple[list[Issue], str, LevelCheck | None]:
    """The level check across each patient's films (`spineseg.data.level_check`): a warning
    for every film whose labels differ from its patient's others, a line that sums it up (or
    says why the check cannot run on these films), and the check itself."""
    from spineseg.data.level_check import check_levels, verdict

    try:
        check = check_levels(samples)
    except DataError as err:
        return [], f"level check not run: {err.problem}", None
    where = {s.id: s.source_path or s.id for s in samples}
    issues = []
    for f in check.films.values():
        if f.agrees:
            continue
        issues.append(Issue("warning", where[f.id], verdict(f)))
    patients = {f.patient for f in check.films.values()}
    odd = {f.patient for f in check.films.values() if not f.agrees}
    note = (
        f"level check: {len(odd)} of {len(patients)} patients with several films have films "
        f"whose labels disagree on the level ({len(issues)} of {len(check.films)} films); "
        f"{check.unchecked} films of patients with one film cannot be checked"
    )
    return issues, note, check


def format_report(report: Report, max_examples: int = 5) -> str:
    """Human-readable report: all errors one per line, warnings grouped by kind."""
    lines = [f"== {report.name} =="]
    lines.append(
        f"films: {report.n_films}   patients: {report.n_patients}   skipped: {report.n_skipped}"
    )
    if report.heights and report.widths:
        h, w = report.heights, report.widths
        lines.append(
            f"image size (min / median / max): height {h[0]} / {h[1]} / {h[2]}, "
            f"width {w[0]} / {w[1]} / {w[2]}"
        )
    if report.bit_depths:
        depths = ", ".join(f"{k}: {v}" for k, v in sorted(report.bit_depths.items()))
        lines.append(f"bit depths: {depths}")
    if report.label_values:
        found = ", ".join(f"{name} ({n})" for name, n in report.label_values.items())
        lines.append(f"label values (films containing them): {found}")
    if report.label_modes:
        modes = ", ".join(f"{k}: {v}" for k, v in sorted(report.label_modes.items()))
        lines.append(f"masks: {modes}")
    if report.splits:
        splits = ", ".join(f"{k}: {f} films / {p} patients" for k, (f, p) in report.splits.items())
        lines.append(f"forced splits: {splits}")
    lines += report.notes
    errors, warnings = report.errors, report.warnings
    lines.append(f"errors: {len(errors)}")
    lines += [f"  ERROR {issue}" for issue in errors]
    lines.append(f"warnings: {len(warnings)}")
    grouped: dict[str, list[str]] = defaultdict(list)
    for issue in warnings:
        grouped[issue.problem].append(issue.path)
    for problem, paths in grouped.items():
        named = [p for p in paths if p]
        lines.append(
            f"  WARNING {problem}"
            + (f" ({len(paths)} film{'s' if len(paths) > 1 else ''})" if named else "")
        )
        lines += [f"    {p}" for p in named[:max_examples]]
        if len(named) > max_examples:
            lines.append(f"    ... and {len(named) - max_examples} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def _spread(values: list[int]) -> tuple[int, int, int]:
    return int(min(values)), int(np.median(values)), int(max(values))


def _sample_issues(sample: Sample, values: Counter[tuple[int, str]]) -> list[Issue]:
    """Per-film checks; also tallies which label values the film contains."""
    where = sample.source_path or sample.id
    try:
        sample.check()
    except DataError as err:
        return [Issue("error", err.path or where, err.problem)]
    present = np.flatnonzero(np.bincount(sample.label.ravel(), minlength=2)).tolist()
    values.update((v, "region" if sample.binary_label and v else label_name(v)) for v in present)
    issues = [Issue("warning", where, w) for w in sample.meta.get("warnings", [])]
    if not [v for v in present if v]:
        return [*issues, Issue("error", where, "empty mask: no foreground pixels")]
    if sample.binary_label:
        return issues
    missing = [n for n, v in zip(TARGET_LEVELS, TARGET_VALUES, strict=True) if v not in present]
    if missing:
        issues.append(Issue("warning", where, f"vertebrae missing from the mask: {missing}"))
    rows = [_mean_row(sample.label, v) for v in present if v]
    if any(a >= b for a, b in pairwise(rows)):
        issues.append(Issue("warning", where, "vertebra labels are not ordered top to bottom"))
    return issues


def _mean_row(label: np.ndarray, value: int) -> float:
    counts = (label == value).sum(axis=1)
    return float(np.dot(counts, np.arange(label.shape[0])) / counts.sum())


def _duplicate_ids(samples: list[Sample]) -> list[Issue]:
    by_id: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_id[sample.id].append(sample)
    issues = []
    for sample_id, group in by_id.items():
        if len(group) > 1:
            where = ", ".join(s.source_path or s.id for s in group)
            issues.append(Issue("error", where, f"duplicate id {sample_id!r}"))
    return issues


def _duplicate_images(samples: list[Sample]) -> list[Issue]:
    """Identical films: harmless within a patient (split together), a leak across patients."""
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_hash[pixel_hash(sample.image)].append(sample)
    issues = []
    for group in by_hash.values():
        if len(group) < 2:
            continue
        where = ", ".join(s.source_path or s.id for s in group)
        patients = sorted({s.patient_id for s in group})
        if len(patients) > 1:
            problem = f"identical images of different patients {patients}: would leak across splits"
            issues.append(Issue("error", where, problem))
        else:
            issues.append(Issue("warning", where, "identical images (same patient)"))
    return issues


def _splits(samples: list[Sample]) -> tuple[dict[str, tuple[int, int]], list[Issue]]:
    """Films/patients per forced split, and patients forced into more than one split."""
    films: Counter[str] = Counter()
    patients: dict[str, set[str]] = defaultdict(set)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for sample in samples:
        if sample.split is None:
            continue
        films[sample.split] += 1
        patients[sample.split].add(sample.patient_id)
        splits_of[sample.patient_id].add(sample.split)
    table = {split: (films[split], len(patients[split])) for split in sorted(films)}
    issues = [
        Issue("error", "", f"patient {p!r} has films in several forced splits: {sorted(s)}")
        for p, s in sorted(splits_of.items())
        if len(s) > 1
    ]
    return table, issues
