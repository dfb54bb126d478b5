"""`spineseg-validate-data`: check a dataset before training on it.

    spineseg-validate-data data=<preset> [data.root=... data.split=...] [export_masks=DIR]

Loads the data (and `data.external`, when set) with on_error=skip so that every problem is
listed at once, prints the report and exits 1 when there are errors. `export_masks=DIR`
writes the derived label masks (uint8, 0 = background, 1..4 = Th8..Th11, original size) as
DIR/<image stem>.png, and the external set's as DIR/external/<image stem>.png, to inspect
them or to train other tools on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import spineseg  # noqa: F401  (registers the OmegaConf resolvers)
from spineseg.cli.common import hydra_app
from spineseg.data.sample import Sample
from spineseg.data.sources import build_spec
from spineseg.data.validate import Report, build_report, cross_check, format_report
from spineseg.errors import ConfigError, DataError
from spineseg.labels import vertebra_labels
from spineseg.utils.io import atomic_open


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
        ok, png = cv2.imencode(".png", label)
        if not ok:
            raise DataError(folder / f"{stem}.png", "cannot encode the mask as PNG")
        with atomic_open(folder / f"{stem}.png") as fh:
            fh.write(png.tobytes())
    return len(samples)


def validate(cfg: DictConfig) -> list[Report]:
    """Reports for data (and data.external), the cross-check attached to the external one."""
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
        out = cfg.get("export_masks")
    except OmegaConfBaseException as err:  # e.g. data.root=??? not set
        raise ConfigError(f"invalid configuration: {err}".splitlines()[0]) from None
    main, skipped = load(data)
    reports = [build_report(main, skipped, name=_title(data, "data"))]
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
    "usage: spineseg-validate-data data=<preset> [data.root=...] [export_masks=DIR]",
)


if __name__ == "__main__":
    sys.exit(main())
