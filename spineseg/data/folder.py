"""`folder` source: the user's own films, `root/images/<id>.<ext>` + `root/masks/<id>.png`.

An optional `root/manifest.csv` (columns id, image, mask[, patient_id][, split]) replaces
the directory listing: it names the films, groups them by patient (so the automatic split
keeps a patient's films together) and may force a film into train|val|test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spineseg.data.io import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    check_on_error,
    handle_error,
    is_image_file,
    load_parallel,
    read_image,
    read_mask,
)
from spineseg.data.sample import Sample
from spineseg.data.sources import register_source
from spineseg.errors import ConfigError, DataError, choices_message
from spineseg.labels import level_values
from spineseg.names import DATA_SPLITS as SPLITS
from spineseg.names import DEFAULT_MASK_LEVELS

log = logging.getLogger(__name__)

LABEL_MODES = ("auto", "binary", "vertebrae")
MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("id", "image", "mask")


@dataclass(frozen=True)
class Entry:
    """One film to load: where its files are and what the manifest says about it."""

    id: str
    image: Path
    mask: Path
    patient_id: str
    split: str | None = None


@register_source("folder")
def folder_source(
    root: str | Path | None = None,
    split: str | None = None,
    on_error: str = "raise",
    skipped: list | None = None,
    label_mode: str = "auto",
    levels: list[str] | tuple[str, ...] = DEFAULT_MASK_LEVELS,
    workers: int | None = None,
) -> list[Sample]:
    """Load every film under `root` with its mask; see the module docstring for the layout.

    levels: what mask values 1..n stand for, top to bottom (default Th8, Th9, Th10, Th11);
        a dataset labelling T1..L5 as 1..17 declares `[Th1, ..., Th12, L1, ..., L5]`, and
        `Th8..Th11` must be among them."""
    check_on_error(on_error)
    if label_mode not in LABEL_MODES:
        raise ConfigError(choices_message("label_mode", label_mode, LABEL_MODES))
    values = level_values(list(levels))
    if not set(level_values(list(DEFAULT_MASK_LEVELS))) <= set(values.tolist()):
        raise ConfigError(
            f"data.source_kwargs.levels {list(levels)} must include Th8, Th9, Th10 and Th11"
        )
    if root is None:
        raise ConfigError("the folder source needs data.root=<folder with images/ and masks/>")
    if split is not None:
        raise ConfigError(
            f"the folder source has no split of its own (got data.split={split!r}); "
            f"force splits with a 'split' column in {MANIFEST}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(root, "data folder not found (expected images/ and masks/ inside)")
    manifest = root / MANIFEST
    try:
        entries = (
            _manifest_entries(manifest, on_error, skipped)
            if manifest.exists()
            else _listed_entries(root, on_error, skipped)
        )
    except DataError as err:  # the whole manifest is unusable
        handle_error(err, on_error, skipped)
        return []
    return load_parallel(
        entries, lambda e: load_entry(e, label_mode, values), on_error, skipped, workers=workers
    )


def load_entry(entry: Entry, label_mode: str = "auto", values: np.ndarray | None = None) -> Sample:
    """Decode one film and its mask and check that they belong together."""
    image, spacing = read_image(entry.image)
    if not entry.mask.exists():
        raise DataError(entry.image, f"missing mask: {entry.mask} does not exist")
    mask = read_mask(entry.mask)
    if mask.shape != image.shape:
        raise DataError(
            entry.mask,
            f"mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from image size "
            f"{image.shape[1]}x{image.shape[0]} of {entry.image.name}",
        )
    if values is None:
        values = level_values(list(DEFAULT_MASK_LEVELS))
    label, mode = mask_to_label(entry.mask, mask, label_mode, values)
    sample = Sample(
        id=entry.id,
        patient_id=entry.patient_id,
        image=image,
        label=label,
        spacing=spacing,
        binary_label=mode == "binary",
        source_path=str(entry.image),
        split=entry.split,
        meta={"mask_path": str(entry.mask), "label_mode": mode},
    )
    sample.check()
    return sample


def mask_to_label(
    path: Path, mask: np.ndarray, label_mode: str, values: np.ndarray
) -> tuple[np.ndarray, str]:
    """Binary {0,1}/{0,255} -> region 1; 0..n -> the declared levels (`values`, by default
    Th8..Th11 for 1..4) as level values. `auto` reads {0,1} as binary: a mask that only ever
    shows its first level is far less likely than a 0/1 region mask."""
    present = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist())
    if not present - {0}:
        raise DataError(path, "empty mask: no foreground pixels")
    n = len(values)
    binary_ok = present <= {0, 1} or present <= {0, 255}
    vertebrae_ok = present <= set(range(n + 1))
    if label_mode == "auto":
        label_mode = "binary" if binary_ok else "vertebrae" if vertebrae_ok else ""
    if label_mode == "binary" and binary_ok:
        return (mask > 0).astype(np.uint8), "binary"
    if label_mode == "vertebrae" and vertebrae_ok:
        lut = np.zeros(256, np.uint8)
        lut[1 : n + 1] = values
        return lut[mask], "vertebrae"
    names = "Th8..Th11" if n == 4 else f"the {n} declared levels"
    expected = {
        "binary": "{0, 1} or {0, 255} (binary region mask)",
        "vertebrae": f"0..{n} (0 = background, 1..{n} = {names})",
        "": f"{{0, 1}} or {{0, 255}} (binary) or 0..{n} ({names})",
    }[label_mode]
    return _bad_values(path, sorted(present), expected)


def _bad_values(path: Path, values: list[int], expected: str) -> tuple[np.ndarray, str]:
    shown = values if len(values) <= 12 else [*values[:12], "..."]
    raise DataError(path, f"label values {shown} outside the expected set {expected}")


# ----------------------------------------------------------------------------- listing


def _listed_entries(root: Path, on_error: str, skipped: list | None) -> list[Entry]:
    """Pair images/<stem>.* with masks/<stem>.* ; every unpaired or ambiguous file is an error."""
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(folder, "folder not found; expected root/images/ and root/masks/")
    images = _by_stem(images_dir, is_image_file, IMAGE_EXTENSIONS, on_error, skipped)
    masks = _by_stem(masks_dir, _is_mask_file, MASK_EXTENSIONS, on_error, skipped)
    entries = []
    unpaired = sorted(set(masks) - set(images))
    for stem, image in sorted(images.items()):
        mask = masks.get(stem)
        if mask is None:
            like = _named_after(stem, unpaired)
            hint = f" ({masks[like].name}? {_RENAME})" if like else ""
            err = DataError(image, f"missing mask: no masks/{stem}.png (or .tif){hint}")
            handle_error(err, on_error, skipped)
            continue
        entries.append(Entry(id=stem, image=image, mask=mask, patient_id=stem))
    for stem in unpaired:
        like = next((i for i in images if _named_after(i, [stem])), None)
        hint = f" (the mask of {images[like].name}? {_RENAME})" if like else ""
        err = DataError(masks[stem], f"mask has no matching image images/{stem}.*{hint}")
        handle_error(err, on_error, skipped)
    return entries


_RENAME = "a mask takes its image's name, masks/<id>.png, or manifest.csv pairs them"


def _named_after(stem: str, candidates: list[str]) -> str | None:
    """A mask stem that is `stem` plus a suffix (`<id>_mask`, `<id>-seg`, `<id>.label`): the
    naming of many public datasets, which the listing does not guess at but names."""
    for other in candidates:
        if len(other) > len(stem) + 1 and other.startswith(stem) and other[len(stem)] in "_-. ":
            return other
    return None


def _is_mask_file(path: Path) -> bool:
    return path.suffix.lower() in MASK_EXTENSIONS


def _by_stem(folder, accept, extensions, on_error: str, skipped: list | None) -> dict[str, Path]:
    """stem -> file; `a.png` next to `a.jpg` is ambiguous, so both are reported, none kept."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if not accept(path):
            err = DataError(
                path,
                f"unsupported extension {path.suffix or '(none)'!r}; "
                f"supported: {', '.join(extensions)}",
            )
            handle_error(err, on_error, skipped)
            continue
        groups.setdefault(path.stem, []).append(path)
    out = {}
    for stem, paths in groups.items():
        if len(paths) == 1:
            out[stem] = paths[0]
            continue
        names = ", ".join(p.name for p in paths)
        for path in paths:
            handle_error(DataError(path, f"duplicate id {stem!r}: {names}"), on_error, skipped)
    return out


def _manifest_entries(path: Path, on_error: str, skipped: list | None) -> list[Entry]:
    """Rows of manifest.csv; paths are relative to the manifest's folder."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as err:
        raise DataError(path, f"cannot read manifest: {err}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            path,
            f"manifest lacks column(s) {', '.join(missing)}; found {', '.join(table.columns)}; "
            "expected id, image, mask[, patient_id][, split]",
        )
    table = table.map(str.strip)
    rows = table.to_dict("records")
    lines: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        lines.setdefault(row["id"], []).append(index + 2)  # 1-based, after the header
    entries = []
    for index, row in enumerate(rows):
        try:
            entry = _manifest_row(path, index + 2, row, lines[row["id"]])
        except DataError as err:
            handle_error(err, on_error, skipped)
            continue
        entries.append(entry)
    return entries


def _manifest_row(path: Path, line: int, row: dict, same_id: list[int]) -> Entry:
    sample_id = row["id"]
    if not sample_id:
        raise DataError(path, f"line {line}: empty id")
    if len(same_id) > 1:  # which row is right is unknown, so every one of them is reported
        others = ", ".join(str(n) for n in same_id if n != line)
        raise DataError(path, f"line {line}: duplicate id {sample_id!r} (also on line {others})")
    if not row["image"]:
        raise DataError(path, f"line {line}: empty image path for id {sample_id!r}")
    if not row["mask"]:
        raise DataError(path, f"line {line}: missing mask for id {sample_id!r}")
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise DataError(
            path, f"line {line}: {choices_message('split', split, SPLITS)} (or leave it empty)"
        )
    return Entry(
        id=sample_id,
        image=path.parent / row["image"],
        mask=path.parent / row["mask"],
        patient_id=row.get("patient_id") or sample_id,
        split=split,
    )
