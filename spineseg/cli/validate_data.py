"""`spineseg-validate-data`: check a dataset before training on it.

    spineseg-validate-data data=<preset> [data.root=... data.split=...] [export_masks=DIR]
                           [check_levels=true] [level_offsets=FILE.csv] [review=DIR]

Loads the data (and `data.external`, when set) with on_error=skip so that every problem is
listed at once, prints the report and exits 1 when there are errors. `export_masks=DIR`
writes the derived label masks (uint8, 0 = background, 1..4 = Th8..Th11, original size) as
DIR/<image stem>.png, and the external set's as DIR/external/<image stem>.png, to inspect
them or to train other tools on them. `check_levels=true` checks each patient's films of
`data` (not `data.external`) against each other on the level (`spineseg.data.level_check`):
a film whose labels sit a level off its patient's other films is a warning, because a level
error scored against it may be the label's; `level_offsets=FILE.csv` writes every checked film's verdict, which
`spineseg-score label_offsets=FILE.csv` reads. `review=DIR` writes, for an expert read, one
sheet per patient whose films disagree (the films side by side, every body named as
labelled) and DIR/review.csv (`spineseg.data.level_review`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import spineseg  # noqa: F401  (registers the OmegaConf resolvers)
from spineseg.cli.common import flag, hydra_app
from spineseg.data.io import write_png
from spineseg.data.sample import Sample
from spineseg.data.sources import build_spec
from spineseg.data.validate import (
    Issue,
    Report,
    build_report,
    cross_check,
    format_report,
    level_issues,
)
from spineseg.errors import ConfigError
from spineseg.labels import vertebra_labels


def load(spec: dict) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Samples + skipped files of one data spec ({source, root, split, source_kwargs}),
    called exactly as the DataModule calls it, but never stopping at the first bad file."""
    skipped: list[tuple[str, str]] = []
    samples = build_spec(spec, on_error="skip", skipped=skipped)
    return samples, skipped


def export_masks(samples: list[Sample], folder: Path) -> int:
    """Write each film's label as <folder>/<image stem>.png, atomically."""
    for sample in samples:
        stem = Path(sample.source_path).stem if sample.source_path else sample.id
        label = sample.label if sample.binary_label else vertebra_labels(sample.label)
        write_png(folder / f"{stem}.png", label)
    return len(samples)


def validate(cfg: DictConfig) -> list[Report]:
    """Reports for data (and data.external), the cross-check attached to the external one."""
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
        out = cfg.get("export_masks")
        offsets, review = cfg.get("level_offsets"), cfg.get("review")
    except OmegaConfBaseException as err:  # e.g. data.root=??? not set
        raise ConfigError(f"invalid configuration: {err}".splitlines()[0]) from None
    if offsets is not None and not isinstance(offsets, str):
        raise ConfigError(f"level_offsets={offsets!r} must be a file name, e.g. offsets.csv")
    if review is not None and not isinstance(review, str):
        raise ConfigError(f"review={review!r} must be a folder name, e.g. level_review/")
    levels = flag(cfg, "check_levels") or offsets is not None or review is not None
    main, skipped = load(data)
    reports = [build_report(main, skipped, name=_title(data, "data"))]
    if levels:
        reports[0].issues += check_levels_of(main, reports[0], offsets, review)
    if out:
        n = export_masks(main, Path(out))
        print(f"wrote {n} masks to {out}")
    external = data.get("external")
    if external:
        ext, ext_skipped = load(external)
        report = build_report(ext, ext_skipped, name=_title(external, "external"))
        report.issues += cross_check(main, ext)
        reports.append(report)
        if out:
            n = export_masks(ext, Path(out) / "external")
            print(f"wrote {n} masks to {Path(out) / 'external'}")
    return reports


def check_levels_of(
    samples: list[Sample], report: Report, offsets: str | None, review: str | None = None
) -> list[Issue]:
    """The level check's warnings; its summary goes to the report's notes, its verdicts to
    `offsets` (CSV) and its review sheets to `review` (a folder) when asked."""
    from spineseg.data.level_check import write_offsets
    from spineseg.data.level_review import write_review

    issues, note, check = level_issues(samples)
    report.notes.append(note)
    if offsets is not None and check is not None:
        write_offsets(offsets, check)
        report.notes.append(f"level offsets of {len(check.films)} films written to {offsets}")
    if review is not None and check is not None:
        n = write_review(samples, check, review)
        report.notes.append(
            f"review sheets of {n} patients whose films disagree written to {review} "
            "(review.csv: fill expert_offset)"
        )
    return issues


def _title(spec: dict, name: str) -> str:
    parts = [f"source={spec.get('source')}"]
    parts += [f"{k}={spec[k]}" for k in ("root", "split") if spec.get(k) is not None]
    kwargs = spec.get("source_kwargs") or {}
    parts += [f"{k}={v}" for k, v in kwargs.items() if v is not None]
    return f"{name}: {' '.join(parts)}"


def _validate(cfg: DictConfig) -> None:
    reports = validate(cfg)
    print("\n\n".join(format_report(r) for r in reports))
    n_errors = sum(len(r.errors) for r in reports)
    if n_errors:
        print(f"\nFAILED: {n_errors} error(s)", file=sys.stderr)
        sys.exit(1)
    print("\nOK: no errors")


main = hydra_app(
    "validate_data",
    _validate,
    "usage: spineseg-validate-data data=<preset> [data.root=...] [export_masks=DIR] "
    "[check_levels=true] [level_offsets=CSV] [review=DIR]",
)


if __name__ == "__main__":
    sys.exit(main())
