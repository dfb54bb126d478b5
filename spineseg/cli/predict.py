"""`spineseg-predict run_dir=<dir> input=<file|folder> output=<dir> [rule=soft] [device=auto]
[overlay=true] [postprocess=val|none|spine] [batch_size=8] [progress=true] [dicom_seg=true]`:
apply a run's
selected ensemble to new films, `batch_size` films at a time (on the GPU with device=auto
when there is one), with a progress bar and the films per second at the end.

postprocess=val (the default) uses the post-processing validation chose for the rule.

Per film it writes `<stem>_mask.png` (region 0/255; vertebrae labels 0..4) and, with
overlay=true, `<stem>_overlay.png`; with probability=true, `<stem>_prob.png` (the calibrated
probability, 16-bit: p = value / 65535); for a DICOM film also `<stem>_seg.dcm`, a DICOM
Segmentation referencing it (dicom_seg=false turns it off); then `predictions.csv` and
`skipped.csv` (films that could not be read or predicted, and SEGs that could not be
written, with the reason: a folder run never drops a file silently), and `predict.json`
(which ensemble, rule and input made them: a later run into the folder with another one is
refused unless overwrite=true). The options and their defaults are conf/apps/predict.yaml.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from omegaconf import DictConfig

from spineseg.checks import check_whole
from spineseg.cli.common import flag, hydra_app
from spineseg.config import APPS_DIR
from spineseg.errors import ConfigError, DataError, RefusedError, choices_message
from spineseg.utils.io import atomic_write_json, atomic_write_text

USAGE = "usage: spineseg-predict run_dir=<dir> input=<file or folder> output=<dir> [key=value ...]"
ENGINES = ("torch", "onnx")
COLUMNS = [
    "file",
    "height",
    "width",
    "region_pixels",
    "region_area_mm2",
    "mean_uncertainty",
    "rule",
    "postprocess",
    "flag_score",  # > 1: outside the normal range validation set (see ensemble/quality.json)
    "flag",  # why: members disagree, unusual area, unusual position, several pieces
]
#: What made an output folder's predictions (`provenance`): a later run replaces them only
#: when it is the same ensemble on the same input, or with overwrite=true.
PROVENANCE = "predict.json"
#: BGR contour colours: region, then Th8..Th11.
COLOURS = [(0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 128, 0), (255, 0, 255)]


def check_options(cfg: DictConfig) -> None:
    """The options that Hydra's types do not check, each a one-line ConfigError."""
    if cfg.engine not in ENGINES:
        raise ConfigError(choices_message("engine", cfg.engine, list(ENGINES)))
    if cfg.engine == "onnx" and not cfg.model:
        raise ConfigError(f"engine=onnx needs model=<ensemble.onnx>; {USAGE}")
    if cfg.engine == "torch" and not cfg.run_dir:
        raise ConfigError(f"run_dir is required; {USAGE}")
    for key in ("overlay", "progress", "dicom_seg", "probability", "overwrite"):
        flag(cfg, key)
    check_whole("batch_size", cfg.batch_size, 1)


def provenance(opts: DictConfig) -> dict[str, str | None]:
    """What a folder of predictions is: the ensemble (run, or ONNX graph), its rule and
    post-processing, and the input, as absolute paths."""
    onnx = opts.engine == "onnx"
    return {
        "engine": str(opts.engine),
        "run_dir": str(Path(str(opts.run_dir)).resolve()) if opts.run_dir else None,
        "model": str(Path(str(opts.model)).resolve()) if onnx else None,
        "rule": None if onnx else str(opts.rule),
        "postprocess": str(opts.postprocess),
        "input": str(Path(str(opts.input)).resolve()),
    }


def claim_output(out: Path, made: dict[str, str | None], overwrite: bool) -> None:
    """Refuse an output folder holding other predictions (or other masks): a second run
    with another run_dir, rule or input would replace some masks, keep others and rewrite
    predictions.csv without the first run's films. The same command again replaces its own
    set; a folder where nothing was written yet (an earlier attempt failed first) is free."""
    holds = (out / "predictions.csv").exists() or any(out.glob("*_mask.png"))
    if overwrite or not holds:
        return
    try:
        before = json.loads((out / PROVENANCE).read_text())
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict):
        what = f"masks whose origin is unknown (no readable {PROVENANCE})"
    else:
        changed = [f"{k}: {before.get(k)} -> {v}" for k, v in made.items() if before.get(k) != v]
        if not changed:
            return
        what = f"the predictions of another ensemble or input ({'; '.join(changed)})"
    raise RefusedError(
        f"output {out} already holds {what}; choose another output folder or pass "
        "overwrite=true to replace them"
    )


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
    from spineseg.data.io import to_uint8

    canvas = cv2.cvtColor(to_uint8(film), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(max(labels.shape) / 400))
    for value in (int(v) for v in np.unique(labels) if v > 0):
        contours, _ = cv2.findContours(
            (labels == value).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        colour = COLOURS[value % len(COLOURS)] if per_label else COLOURS[0]
        cv2.drawContours(canvas, contours, -1, colour, thickness)
    return canvas


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def run(opts: DictConfig) -> tuple[int, int, float]:
    """Predict every input film; returns (predicted, skipped, films per second)."""
    from tqdm import tqdm

    from spineseg.data.io import is_dicom, read_image, write_png
    from spineseg.dicom_seg import write_seg
    from spineseg.ensemble.quality import film_features, flag
    from spineseg.predict import load_ensemble

    source, out = Path(str(opts.input)), Path(str(opts.output))
    films_dir = source if source.is_dir() else source.parent
    if out.resolve() == films_dir.resolve():
        raise ConfigError(
            f"output {out} is the input folder: the masks would mix with the films (and be "
            "read as films by the next run); choose another output folder"
        )
    files, skipped = list_inputs(source)
    made = provenance(opts)
    claim_output(out, made, bool(opts.overwrite))
    post = None if opts.postprocess == "val" else str(opts.postprocess)
    if opts.engine == "onnx":  # the exported graph carries its rule and post-processing
        from spineseg.onnx_export import OnnxEnsemble

        ensemble = OnnxEnsemble(str(opts.model), opts.run_dir or None)
        if post is not None:
            ensemble.postprocess = post
    else:
        ensemble = load_ensemble(
            str(opts.run_dir), rule=str(opts.rule), device=str(opts.device), postprocess=post
        )
    draw, seg, prob = opts.overlay, opts.dicom_seg, opts.probability
    batch_size = int(opts.batch_size)
    rows: list[list[object]] = []

    def skip(path: Path, problem: str, err: Exception | None = None) -> None:
        if source.is_file():  # one film asked for: its problem is the run's error
            raise DataError(path, problem) from err
        skipped.append((path.name, problem))
        tqdm.write(f"skipped {path.name}: {problem}", file=sys.stderr)

    def problem_of(err: Exception) -> str:
        return err.problem if isinstance(err, DataError) else f"{type(err).__name__}: {err}"

    def finish(path: Path, stem: str, film: np.ndarray, spacing, pred) -> None:
        mask = pred.labels * 255 if ensemble.target == "region" else pred.labels
        write_png(out / f"{stem}_mask.png", mask.astype(np.uint8))
        if draw:
            per_label = ensemble.target != "region"
            write_png(out / f"{stem}_overlay.png", overlay(film, pred.labels, per_label))
        if prob:  # calibrated on validation, 16 bits: p = value / 65535
            scaled = np.round(np.clip(pred.probability, 0, 1) * 65535).astype(np.uint16)
            write_png(out / f"{stem}_prob.png", scaled)
        pixels = int((pred.labels > 0).sum())
        area = "" if spacing is None else f"{pixels * spacing[0] * spacing[1]:.4f}"
        h, w = pred.shape
        unc = f"{float(pred.uncertainty.mean()):.6f}"
        score, why = "", []
        if ensemble.limits is not None:  # a cascade's ranges were set on its crops
            seen = (pred.labels, pred.uncertainty)
            if pred.box is not None:
                seen = (pred.box.crop(pred.labels), pred.box.crop(pred.uncertainty))
            value, why = flag(film_features(*seen), ensemble.limits)
            score = f"{value:.3f}"
        if pred.notes:
            why = [*why, *pred.notes]
            score = score or "inf"
        wh, ww = ensemble.pipeline.image_size
        if h < wh or w < ww:  # upsampled: whatever it shows, the detail is not in the film
            why = [*why, "smaller than the working resolution"]
            tqdm.write(
                f"warning: {path.name}: {h}x{w} film (HxW) is smaller than the working "
                f"resolution {wh}x{ww}; upsampled and flagged",
                file=sys.stderr,
            )
        reasons = "; ".join(why)
        rows.append(
            [
                path.name,
                h,
                w,
                pixels,
                area,
                unc,
                ensemble.rule,
                ensemble.postprocess,
                score,
                reasons,
            ]
        )
        if seg and is_dicom(path):
            try:  # the PNG stands; a SEG that cannot reference its film is listed, not fatal
                write_seg(
                    path, pred.labels, ensemble.target, out / f"{stem}_seg.dcm", ensemble.rule
                )
            except DataError as err:
                skipped.append((path.name, f"DICOM SEG not written: {err.problem}"))

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PROVENANCE, made)  # before the first mask: a kill leaves it named
    pairs = list(zip(files, output_stems(files), strict=True))
    show = opts.progress and len(pairs) > 1
    with tqdm(total=len(pairs), unit="film", disable=not show, file=sys.stderr) as bar:
        for start in range(0, len(pairs), batch_size):
            batch = []
            for path, stem in pairs[start : start + batch_size]:
                try:
                    batch.append((path, stem, *read_image(path)))
                except DataError as err:
                    if source.is_file():
                        raise
                    skip(path, err.problem)
            try:  # one batch through every model; a film it rejects is retried alone
                preds = ensemble.predict_batch([film for _, _, film, _ in batch])
            except (DataError, ValueError, cv2.error):
                preds = None
            for j, (path, stem, film, spacing) in enumerate(batch):
                try:
                    pred = preds[j] if preds is not None else ensemble.predict(film)
                    finish(path, stem, film, spacing, pred)
                except (DataError, ValueError, cv2.error) as err:
                    # A film the pipeline cannot take (odd shape or depth, an OpenCV failure)
                    # is this film's problem: a folder run lists it and goes on.
                    skip(path, problem_of(err), err)
            bar.update(len(pairs[start : start + batch_size]))
    rate = len(rows) / max(time.perf_counter() - started, 1e-9)
    write_csv(out / "predictions.csv", COLUMNS, rows)
    write_csv(out / "skipped.csv", ["file", "reason"], skipped)
    if not rows:
        reason = f"none of the {len(skipped)} input file(s) could be read; see skipped.csv"
        raise DataError(source, reason)
    return len(rows), len(skipped), rate


def _predict(cfg: DictConfig) -> None:
    check_options(cfg)
    done, skipped, rate = run(cfg)
    which = cfg.rule if cfg.engine == "torch" else f"exported ({cfg.model})"
    note = f"; skipped {skipped} (see skipped.csv)" if skipped else ""
    print(
        f"predicted {done} film(s) with the {which} ensemble -> {cfg.output}"
        f" (predictions.csv){note}; {rate:.1f} films/s"
    )


main = hydra_app("predict", _predict, USAGE, APPS_DIR)


if __name__ == "__main__":
    sys.exit(main())
