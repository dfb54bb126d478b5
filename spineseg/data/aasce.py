"""`aasce` source: AASCE 2019 / SpineWeb 16 films with 68 vertebra-corner landmarks.

Layout (the original `boostnet_labeldata` release):
    root/data/<split>/<name>.jpg
    root/labels/<split>/<name>.jpg.mat            key 'p2': 68 x 2 (x, y) in pixels
    root/labels/<split>/landmarks.csv + filenames.csv   68 x then 68 y, normalised by W, H
Vertebra k (points 4k..4k+3) is T1..T12, L1..L5 for k = 0..16; each is drawn as a filled
polygon at full resolution with its level value (`spineseg.labels`; Th8..Th11 are k = 7..10),
so the masks are exact and independent of later resizing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from spineseg.data.io import check_on_error, handle_error, load_parallel, read_image
from spineseg.data.sample import Sample
from spineseg.data.sources import register_source
from spineseg.errors import ConfigError, DataError, choices_message
from spineseg.labels import level_value
from spineseg.names import NUM_TARGET

log = logging.getLogger(__name__)

SPLITS = ("training", "test")
SUBSETS = ("all", "internal", "external")
LANDMARK_FORMATS = ("auto", "mat", "csv")
NUM_POINTS = 68
FIRST_VERTEBRA = 7  # Th8 is the 8th vertebra from T1 (k = 0)
#: The level of vertebra k, top to bottom.
VERTEBRA_NAMES: tuple[str, ...] = (
    *(f"Th{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
)
TARGET_K = range(FIRST_VERTEBRA, FIRST_VERTEBRA + NUM_TARGET)
#: A landmark this far outside the image (fraction of its size) means the wrong image or a
#: wrong normalisation; closer misses happen on real films whose lumbar spine is cut off.
OUTSIDE_TOLERANCE = 0.10

#: `sunhl-1th-06-Jan-2017-192 A AP.jpg` -> patient 192, film A. The number is the patient;
#: the letter the film (A, B, ... are follow-ups, possibly on later dates).
PATIENT_RE = re.compile(
    r"\d{1,2}-[A-Za-z]{3}-\d{4}-(?P<patient>\d+)\s+(?P<film>[A-Za-z])\s*AP", re.IGNORECASE
)


@dataclass(frozen=True)
class Film:
    """One labelled film to load: the image, where its landmarks come from."""

    name: str  # image file name, e.g. 'x.jpg'
    image: Path
    label_file: Path  # the .mat file, or landmarks.csv
    points: np.ndarray | None = None  # normalised 68x2 from landmarks.csv; None -> read .mat


def patient_key(name: str) -> tuple[str, bool]:
    """(patient, recognised): the patient number from the file name, or the stem when the
    name does not follow the `...-<DD>-<Mon>-<YYYY>-<patient> <film> AP` pattern."""
    match = PATIENT_RE.search(name)
    if match:
        return match["patient"].lstrip("0") or "0", True
    return Path(name).stem, False


@register_source("aasce")
def aasce_source(
    root: str | Path | None = None,
    split: str = "training",
    on_error: str = "raise",
    skipped: list | None = None,
    subset: str = "all",
    n_internal: int = 183,
    n_external: int = 58,
    subset_seed: int = 0,
    max_images: int | None = None,
    landmarks: str = "auto",
    workers: int | None = None,
) -> list[Sample]:
    """Films of one AASCE split with Th8..Th11 masks.

    subset: all | internal | external - the paper-shaped benchmark, disjoint by patient
        (see `select_subset`); n_internal, n_external, subset_seed define the draw.
    max_images: keep the first N films (by name) after the subset, for quick dev runs.
    landmarks: auto (the .mat files when there are any, else the CSVs) | mat | csv.
    workers: decoding threads (default: up to 8).
    """
    check_on_error(on_error)
    if split not in SPLITS:
        raise ConfigError(choices_message("aasce split", split, SPLITS))
    if subset not in SUBSETS:
        raise ConfigError(choices_message("aasce subset", subset, SUBSETS))
    if landmarks not in LANDMARK_FORMATS:
        raise ConfigError(choices_message("aasce landmarks format", landmarks, LANDMARK_FORMATS))
    if max_images is not None and int(max_images) < 1:
        raise ConfigError(f"max_images must be a positive number or null, got {max_images}")
    if root is None:
        raise ConfigError("the aasce source needs data.root (or SPINESEG_AASCE_ROOT)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(root, f"folder not found; data.root is the AASCE folder holding "
                              f"data/{split}/ and labels/{split}/")  # fmt: skip
    image_dir, label_dir = root / "data" / split, root / "labels" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataError(
                folder, f"not an AASCE tree: expected data/{split}/ and labels/{split}/"
            )
    try:
        films = list_films(image_dir, label_dir, landmarks, on_error, skipped)
    except DataError as err:  # the landmark table as a whole is unusable
        handle_error(err, on_error, skipped)
        return []
    if subset != "all":
        chosen = select_subset(
            [f.name for f in films], subset, int(n_internal), int(n_external), int(subset_seed)
        )
        films = [f for f in films if f.name in chosen]
    if max_images is not None:
        films = films[: int(max_images)]
    return load_parallel(films, load_film, on_error, skipped, workers=workers)


# ----------------------------------------------------------------------------- listing


def list_films(
    image_dir: Path, label_dir: Path, landmarks: str, on_error: str, skipped: list | None
) -> list[Film]:
    """Labelled films sorted by name. Orphans either way and duplicate ids are reported."""
    if landmarks == "auto":
        landmarks = "mat" if any(label_dir.glob("*.mat")) else "csv"
    films = (
        _csv_films(image_dir, label_dir) if landmarks == "csv" else _mat_films(image_dir, label_dir)
    )
    by_id: dict[str, list[Film]] = {}
    for film in films:
        by_id.setdefault(Path(film.name).stem, []).append(film)
    kept: list[Film] = []
    for stem, group in sorted(by_id.items()):
        if len(group) > 1:
            names = ", ".join(f.name for f in group)
            for film in group:
                where = film.label_file
                handle_error(DataError(where, f"duplicate id {stem!r}: {names}"), on_error, skipped)
            continue
        film = group[0]
        if not film.image.is_file():
            err = DataError(film.label_file, f"missing image {film.image} for these landmarks")
            handle_error(err, on_error, skipped)
            continue
        kept.append(film)
    labelled = {f.name for f in films}
    for image in sorted(image_dir.iterdir()):
        if image.is_file() and not image.name.startswith(".") and image.name not in labelled:
            err = DataError(image, f"image has no landmarks in {label_dir}")
            handle_error(err, on_error, skipped)
    return kept


def _mat_films(image_dir: Path, label_dir: Path) -> list[Film]:
    return [
        Film(
            name=mat.name[: -len(".mat")],
            image=image_dir / mat.name[: -len(".mat")],
            label_file=mat,
        )
        for mat in sorted(label_dir.glob("*.mat"))
    ]


def _csv_films(image_dir: Path, label_dir: Path) -> list[Film]:
    """filenames.csv + landmarks.csv: one row per film, same order; checked as a whole,
    because a row-count mismatch means every row may be paired with the wrong film."""
    names_csv, points_csv = label_dir / "filenames.csv", label_dir / "landmarks.csv"
    for path in (names_csv, points_csv):
        if not path.is_file():
            raise DataError(
                path, "missing: need <name>.jpg.mat files or landmarks.csv + filenames.csv"
            )
    try:
        names = pd.read_csv(names_csv, header=None, dtype=str)[0].str.strip().tolist()
        table = pd.read_csv(points_csv, header=None)
    except Exception as err:
        raise DataError(names_csv.parent, f"cannot read landmark CSVs: {err}") from None
    if table.shape[1] != 2 * NUM_POINTS:
        raise DataError(
            points_csv, f"{table.shape[1]} values per row, expected {2 * NUM_POINTS} (68 x, 68 y)"
        )
    if len(table) != len(names):
        raise DataError(points_csv, f"{len(table)} rows but filenames.csv lists {len(names)} films")
    try:
        values = table.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(points_csv, "non-numeric landmark values") from None
    points = np.stack([values[:, :NUM_POINTS], values[:, NUM_POINTS:]], axis=-1)
    return [
        Film(name=name, image=image_dir / name, label_file=points_csv, points=pts)
        for name, pts in zip(names, points, strict=True)
    ]


def select_subset(
    names: list[str], subset: str, n_internal: int, n_external: int, seed: int
) -> set[str]:
    """The paper-shaped benchmark: patients shuffled by `seed`; `internal` takes whole
    patients until exactly n_internal films, `external` then takes n_external films of the
    remaining patients. Patients that would overshoot are passed over, not split."""
    by_patient: dict[str, list[str]] = {}
    for name in sorted(names):
        by_patient.setdefault(patient_key(name)[0], []).append(name)
    patients = sorted(by_patient)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    internal = _fill(order, by_patient, n_internal, "internal", len(names))
    if subset == "internal":
        return {n for p in internal for n in by_patient[p]}
    rest = [p for p in order if p not in internal]
    external = _fill(rest, by_patient, n_external, "external", len(names))
    return {n for p in external for n in by_patient[p]}


def _fill(order: list[str], by_patient: dict[str, list[str]], n: int, what: str, total: int):
    taken: list[str] = []
    left = n
    for patient in order:
        if left == 0:
            break
        if len(by_patient[patient]) <= left:
            taken.append(patient)
            left -= len(by_patient[patient])
    if left:
        raise ConfigError(
            f"aasce subset {what} needs {n} films of whole patients but only {n - left} could "
            f"be gathered from {total} films; lower n_{what} or use subset=all"
        )
    return taken


# ----------------------------------------------------------------------------- loading


def load_film(film: Film) -> Sample:
    """Decode one film, check its landmarks and draw Th8..Th11."""
    image, spacing = read_image(film.image)
    height, width = image.shape
    where = film.label_file
    if film.points is None:
        points = read_mat_points(film.label_file)
    else:
        points = film.points * np.array([width, height], np.float64)
        where = f"{film.label_file} (row of {film.name})"
    outside = check_points(where, points, (height, width))
    label, undrawn = draw_vertebrae(where, points, (height, width))
    patient, recognised = patient_key(film.name)
    meta = {
        "label_file": str(film.label_file),
        "landmarks": points.astype(np.float32),
        "patient_key": "file name" if recognised else "stem",
        "warnings": [],
    }
    if not recognised:
        meta["warnings"].append("patient key not recognised in the file name; using the stem")
    if outside:
        meta["warnings"].append(
            f"landmarks {outside} (not Th8..Th11) lie slightly outside the image"
        )
    if undrawn:
        meta["warnings"].append(
            f"vertebrae {undrawn} not drawn (degenerate, hidden or out-of-order landmarks)"
        )
    return Sample(
        id=Path(film.name).stem,
        patient_id=patient,
        image=image,
        label=label,
        spacing=spacing,
        source_path=str(film.image),
        meta=meta,
    )


def read_mat_points(path: Path) -> np.ndarray:
    """The 68 x 2 (x, y) pixel landmarks of one `.mat` file, as float64."""
    from scipy.io import loadmat

    try:
        content = loadmat(path)
    except Exception as err:
        raise DataError(path, f"cannot read MATLAB landmark file: {err}") from None
    if "p2" not in content:
        keys = ", ".join(k for k in content if not k.startswith("__"))
        raise DataError(path, f"no 'p2' landmark array (keys: {keys or 'none'})")
    return np.asarray(content["p2"], np.float64)


def check_points(where, points: np.ndarray, shape: tuple[int, int]) -> list[int]:
    """Raise for a wrong shape, NaNs, or points clearly outside the image; return the
    indices of undrawn points that are only slightly outside (worth a warning)."""
    if points.shape != (NUM_POINTS, 2):
        raise DataError(where, f"landmarks have shape {points.shape}, expected (68, 2)")
    if not np.isfinite(points).all():
        bad = sorted(set(np.flatnonzero(~np.isfinite(points).all(axis=1)).tolist()))
        raise DataError(where, f"landmarks {bad} are NaN or infinite")
    height, width = shape
    limit = np.array([width, height], np.float64)
    # Pixel centres are integers, so the image spans [-0.5, size - 0.5] in each axis.
    outside = ((points < -0.5) | (points > limit - 0.5)).any(axis=1)
    drawn = np.arange(4 * TARGET_K.start, 4 * TARGET_K.stop)
    far = ((points < -OUTSIDE_TOLERANCE * limit) | (points > (1 + OUTSIDE_TOLERANCE) * limit)).any(
        axis=1
    )
    if outside[drawn].any() or far.any():
        bad = np.flatnonzero(outside if outside[drawn].any() else far).tolist()
        raise DataError(
            where,
            f"landmarks {bad} lie outside the {width}x{height} image (wrong image, or "
            "coordinates not in pixels / not normalised)",
        )
    return np.flatnonzero(outside).tolist()


def vertebra_polygons(points: np.ndarray, ks: range = TARGET_K) -> list[np.ndarray]:
    """Corner quads (4 x 2 each) of vertebrae `ks` (default Th8..Th11), ordered by angle
    around their centroid: the files' corner order is not reliable, a fixed order would
    draw bow-ties."""
    quads = []
    for k in ks:
        quad = np.asarray(points[4 * k : 4 * k + 4], np.float64)
        centre = quad.mean(axis=0)
        angles = np.arctan2(quad[:, 1] - centre[1], quad[:, 0] - centre[0])
        quads.append(quad[np.argsort(angles, kind="stable")])
    return quads


def draw_vertebrae(where, points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, list]:
    """HxW uint8 level values of all 17 vertebrae as filled polygons at sub-pixel precision,
    plus the names of those that could not be drawn.

    Th8..Th11 are drawn last, so where a neighbour's polygon overlaps theirs the region keeps
    its exact shape; a degenerate or vanished Th8..Th11 is an error, any other vertebra is
    left out with a warning (lumbar vertebrae are often cut off at the film's edge)."""
    label = np.zeros(shape, np.uint8)
    shift = 4  # cv2 fixed-point: coordinates in 1/16 pixel
    order = [k for k in range(len(VERTEBRA_NAMES)) if k not in TARGET_K] + list(TARGET_K)
    quads = dict(zip(order, vertebra_polygons(points, order), strict=True))
    undrawn = _out_of_column(quads)
    for k in order:
        if VERTEBRA_NAMES[k] in undrawn:
            continue
        name, quad = VERTEBRA_NAMES[k], quads[k]
        if polygon_area(quad) < 1.0:
            if k in TARGET_K:
                raise DataError(where, f"{name} landmarks are degenerate (polygon area < 1 px)")
            undrawn.append(name)
            continue
        fixed = np.rint(quad * (1 << shift)).astype(np.int32)
        cv2.fillPoly(label, [fixed], color=level_value(name), lineType=cv2.LINE_8, shift=shift)
    present = set(np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist())
    missing = [VERTEBRA_NAMES[k] for k in order if level_value(VERTEBRA_NAMES[k]) not in present]
    lost = [n for n in missing if n not in undrawn]
    if any(VERTEBRA_NAMES[k] in lost for k in TARGET_K):
        raise DataError(where, f"vertebrae {lost} vanished (overlapping landmarks?)")
    return label, undrawn + lost


def _out_of_column(quads: dict[int, np.ndarray]) -> list[str]:
    """Vertebrae outside Th8..Th11 whose centroid is not below the one above it (walking
    down from Th11) or above the one below it (walking up from Th8). Some AASCE files place
    the landmarks of a vertebra that is off the film out of the column (23 of the 481 training
    films do so for L5, one for T1); drawn, they would teach a level where it is not."""
    rows = {k: float(q[:, 1].mean()) for k, q in quads.items()}
    skipped = []
    above = rows[TARGET_K[-1]]
    for k in range(TARGET_K.stop, len(VERTEBRA_NAMES)):
        if rows[k] <= above:
            skipped.append(VERTEBRA_NAMES[k])
        else:
            above = rows[k]
    below = rows[TARGET_K[0]]
    for k in range(TARGET_K.start - 1, -1, -1):
        if rows[k] >= below:
            skipped.append(VERTEBRA_NAMES[k])
        else:
            below = rows[k]
    return skipped


def polygon_area(quad: np.ndarray) -> float:
    """Shoelace area of a polygon given in order."""
    x, y = quad[:, 0], quad[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)
