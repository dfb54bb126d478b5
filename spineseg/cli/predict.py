"""`spineseg-predict run_dir=<dir> input=<file|folder> output=<dir> [rule=soft] [device=auto]
[overlay=true] [postprocess=val|none|spine]`: apply a run's selected ensemble to new films.

postprocess=val (the default) uses the post-processing validation chose for the rule.

Per film it writes `<stem>_mask.png` (region 0/255; vertebrae labels 0..4) and, with
overlay=true, `<stem>_overlay.png`; then `predictions.csv` and `skipped.csv` (films that could
not be read or predicted, with the reason: a folder run never drops a file silently). Plain key=value
arguments rather than Hydra: there is no config tree to compose here.
"""

from __future__ import annotations

import csv
import io
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from spineseg.cli.common import one_line_errors
from spineseg.errors import ConfigError, DataError, choices_message
from spineseg.utils.io import atomic_open, atomic_write_text

USAGE = (
    "usage: spineseg-predict run_dir=<dir> input=<file or folder> output=<dir> "
    "[rule=soft] [device=auto] [overlay=true] [postprocess=val|none|spine]"
)
DEFAULTS: dict[str, str | None] = {
    "run_dir": None,
    "input": None,
    "output": None,
    "rule": "soft",
    "device": "auto",
    "overlay": "true",
    "postprocess": "val",
}
COLUMNS = [
    "file",
    "height",
    "width",
    "region_pixels",
    "region_area_mm2",
    "mean_uncertainty",
    "rule",
    "postprocess",
]
#: BGR contour colours: region, then Th8..Th11.
COLOURS = [(0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 128, 0), (255, 0, 255)]
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """`key=value` pairs; unknown keys and missing required ones are config errors."""
    opts = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r} is not key=value; {USAGE}")
        if key not in DEFAULTS:
            raise ConfigError(choices_message("argument", key, list(DEFAULTS)))
        opts[key] = value
    missing = [k for k, v in opts.items() if v in (None, "")]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; {USAGE}")
    if opts["overlay"].lower() not in _BOOL:
        raise ConfigError(f"overlay={opts['overlay']!r} must be true or false")
    return opts  # type: ignore[return-value]


def list_inputs(path: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """A file, or a folder's files (sorted, not recursive); non-image files are reported."""
    from spineseg.data.io import is_image_file

    if path.is_file():
        return [path], []
    if not path.is_dir():
        raise DataError(path, "input does not exist")
    files, skipped = [], []
    for p in sorted(path.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if is_image_file(p):
            files.append(p)
        else:
            skipped.append((p.name, "not a supported image file"))
    if not files:
        raise DataError(path, "no image files (.png, .jpg, .tif, .dcm) in the input folder")
    return files, skipped


def output_stems(files: Sequence[Path]) -> list[str]:
    """File stems; films sharing a stem (a.png, a.dcm) keep their extension to stay apart."""
    counts = Counter(p.stem for p in files)
    return [p.stem if counts[p.stem] == 1 else p.name for p in files]


def overlay(film: np.ndarray, labels: np.ndarray, per_label: bool = False) -> np.ndarray:
    """The 8-bit film in colour with the mask's contour (one colour per vertebra when
    `per_label`) drawn on it, for a quick visual check of each prediction."""
    from spineseg.data.datamodule import to_uint8

    canvas = cv2.cvtColor(to_uint8(film), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(max(labels.shape) / 400))
    for value in (int(v) for v in np.unique(labels) if v > 0):
        contours, _ = cv2.findContours(
            (labels == value).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        colour = COLOURS[value % len(COLOURS)] if per_label else COLOURS[0]
        cv2.drawContours(canvas, contours, -1, colour, thickness)
    return canvas


def write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise DataError(path, "PNG encoding failed")
    with atomic_open(path, "wb") as fh:
        fh.write(buf.tobytes())


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def run(opts: dict[str, str]) -> tuple[int, int]:
    """Predict every input film; returns (predicted, skipped)."""
    from spineseg.data.io import read_image
    from spineseg.predict import load_ensemble

    source, out = Path(opts["input"]), Path(opts["output"])
    files, skipped = list_inputs(source)
    post = None if opts["postprocess"] == "val" else opts["postprocess"]
    ensemble = load_ensemble(
        opts["run_dir"], rule=opts["rule"], device=opts["device"], postprocess=post
    )
    draw = _BOOL[opts["overlay"].lower()]
    rows = []
    for path, stem in zip(files, output_stems(files), strict=True):
        try:
            film, spacing = read_image(path)
        except DataError as err:
            if source.is_file():
                raise
            skipped.append((path.name, err.problem))
            print(f"skipped {path.name}: {err.problem}", file=sys.stderr)
            continue
        try:
            pred = ensemble.predict(film)
            mask = pred.labels * 255 if ensemble.target == "region" else pred.labels
            write_png(out / f"{stem}_mask.png", mask.astype(np.uint8))
            if draw:
                per_label = ensemble.target != "region"
                write_png(out / f"{stem}_overlay.png", overlay(film, pred.labels, per_label))
        except (DataError, ValueError, cv2.error) as err:
            # A film the pipeline cannot take (odd shape or depth, an OpenCV failure) is this
            # film's problem: a folder run lists it and goes on with the others.
            problem = err.problem if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
            if source.is_file():
                raise DataError(path, problem) from err
            skipped.append((path.name, problem))
            print(f"skipped {path.name}: {problem}", file=sys.stderr)
            continue
        pixels = int((pred.labels > 0).sum())
        area = "" if spacing is None else f"{pixels * spacing[0] * spacing[1]:.4f}"
        h, w = pred.shape
        unc = f"{float(pred.uncertainty.mean()):.6f}"
        rows.append([path.name, h, w, pixels, area, unc, ensemble.rule, ensemble.postprocess])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "predictions.csv", COLUMNS, rows)
    write_csv(out / "skipped.csv", ["file", "reason"], skipped)
    if not rows:
        reason = f"none of the {len(skipped)} input file(s) could be read; see skipped.csv"
        raise DataError(source, reason)
    return len(rows), len(skipped)


@one_line_errors
def _main(argv: Sequence[str]) -> None:
    opts = parse_args(argv)
    done, skipped = run(opts)
    note = f"; skipped {skipped} (see skipped.csv)" if skipped else ""
    print(
        f"predicted {done} film(s) with the {opts['rule']} ensemble -> {opts['output']}"
        f" (predictions.csv){note}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    _main(args)  # a SpinesegError exits 1 with one line (one_line_errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
