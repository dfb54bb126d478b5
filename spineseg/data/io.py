"""Reading users' films and masks: PNG, JPEG, TIFF (8/16 bit) and DICOM.

Every failure is a DataError naming the file, because users bring their own data and the
first thing they need to know is *which* file is wrong and why. Raster files are decoded
with OpenCV (fast, releases the GIL so loaders can use threads); DICOM goes through pydicom
so the display transforms (Modality LUT, VOI LUT/windowing, MONOCHROME1) are the
standard's, not ours.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from spineseg.errors import ConfigError, DataError, choices_message
from spineseg.utils.io import atomic_open

log = logging.getLogger(__name__)

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = RASTER_EXTENSIONS + DICOM_EXTENSIONS
MASK_EXTENSIONS = (".png", ".tif", ".tiff")  # lossless only: JPEG would smear label values
ON_ERROR = ("raise", "skip")

_GRAY_HINT = "an RGB image whose three channels are equal is accepted as gray"

T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------- images


def to_uint8(image: np.ndarray) -> np.ndarray:
    """16-bit films are min-max scaled to 8 bits (DICOM windowing happens before)."""
    if image.dtype == np.uint8:
        return image
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.round((image.astype(np.float32) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def write_png(path: str | Path, array: np.ndarray) -> None:
    """`array` (8 or 16 bit, gray or BGR) as a PNG at `path`, atomically: a kill leaves the
    old file or the new one, never half of one."""
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise DataError(path, "PNG encoding failed")
    with atomic_open(path, "wb") as fh:
        fh.write(buf.tobytes())


def is_image_file(path: str | Path) -> bool:
    """A supported extension, or no extension but a DICOM preamble (PACS exports)."""
    path = Path(path)
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or (suffix == "" and _has_dicom_preamble(path))


def is_dicom(path: str | Path) -> bool:
    """A DICOM file by extension, or without one by its preamble (PACS exports)."""
    path = Path(path)
    suffix = path.suffix.lower()
    return suffix in DICOM_EXTENSIONS or (suffix == "" and _has_dicom_preamble(path))


def read_image(path: str | Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode a film to HxW uint8/uint16 grayscale (bright = dense) and its (row, col)
    pixel spacing in mm when the file carries one (DICOM only)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if is_dicom(path):
        return _read_dicom(path)
    if suffix not in RASTER_EXTENSIONS:
        raise DataError(
            path,
            f"unsupported image extension {suffix or '(none)'!r}; "
            f"supported: {', '.join(IMAGE_EXTENSIONS)}",
        )
    image = _to_gray(path, _decode_raster(path, suffix), "image")
    if image.dtype not in (np.uint8, np.uint16):
        raise DataError(
            path, f"unexpected bit depth ({image.dtype} pixels); expected 8- or 16-bit grayscale"
        )
    return image, None


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a label mask to HxW uint8 (values are checked by the caller, who knows
    whether binary or per-vertebra labels are expected)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MASK_EXTENSIONS:
        raise DataError(
            path,
            f"unsupported mask extension {suffix or '(none)'!r}; masks must be lossless "
            f"{', '.join(MASK_EXTENSIONS)}",
        )
    mask = _to_gray(path, _decode_raster(path, suffix), "mask")
    if mask.dtype == np.uint16:
        raise DataError(
            path, "16-bit mask; masks must be 8-bit (values 0/1, 0/255 or 0..4 for Th8..Th11)"
        )
    if mask.dtype != np.uint8:
        raise DataError(path, f"unexpected mask bit depth ({mask.dtype}); masks must be 8-bit")
    return mask


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as err:
        raise DataError(path, f"cannot read file: {err.strerror or err}") from None
    if not data:
        raise DataError(path, "file is empty")
    return data


def _decode_raster(path: Path, suffix: str) -> np.ndarray:
    data = _read_bytes(path)
    _check_complete(path, data, suffix)
    if suffix in (".jpg", ".jpeg"):
        return _decode_jpeg_strict(path, data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DataError(path, f"cannot decode: corrupt or not a {suffix[1:].upper()} file")
    return image


def _decode_jpeg_strict(path: Path, data: bytes) -> np.ndarray:
    """libjpeg-turbo with warnings as errors: damaged scan data that OpenCV (and Pillow)
    would decode into a partly grey film, with only a line on stderr, stops here."""
    import simplejpeg

    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        gray = colorspace.lower() == "gray"
        return simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "BGR", strict=True)
    except ValueError as err:
        raise DataError(path, f"damaged JPEG ({err})") from None


def _check_complete(path: Path, data: bytes, suffix: str) -> None:
    """OpenCV decodes a truncated JPEG/PNG into a partly grey image with only a stderr
    warning; a cheap structural check turns that into an error instead."""
    if suffix in (".jpg", ".jpeg"):
        if not data.startswith(b"\xff\xd8"):
            raise DataError(path, "not a JPEG file (no start-of-image marker)")
        # Entropy-coded data never contains FFD9, so the end-of-image marker must follow
        # the last start-of-scan marker in a complete file.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise DataError(path, "truncated JPEG (no end-of-image marker after the scan)")
    elif suffix == ".png":
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise DataError(path, "not a PNG file (bad signature)")
        if b"IEND" not in data[-64:]:
            raise DataError(path, "truncated PNG (no IEND chunk)")


def _to_gray(path: Path, image: np.ndarray, what: str) -> np.ndarray:
    """Accept gray, gray stored as RGB(A) with equal channels, and opaque alpha; reject
    real colour, because a colour photo of a film is not what the models were trained on."""
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise DataError(path, f"unexpected {what} shape {image.shape}; expected a 2-D image")
    channels = image.shape[2]
    if channels == 1:
        return image[..., 0]
    if channels == 4:
        alpha = image[..., 3]
        if alpha.min() != np.iinfo(image.dtype).max:
            raise DataError(path, f"{what} has transparency (alpha channel); save it without")
        image = image[..., :3]
        channels = 3
    if channels != 3:
        raise DataError(path, f"unexpected {what} with {channels} channels; expected grayscale")
    first = image[..., 0]
    if np.array_equal(first, image[..., 1]) and np.array_equal(first, image[..., 2]):
        return np.ascontiguousarray(first)
    raise DataError(
        path, f"RGB {what} where grayscale is expected; convert it to grayscale ({_GRAY_HINT})"
    )


# ----------------------------------------------------------------------------- DICOM


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _read_dicom(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    # A clear "not found"/"empty" before pydicom's own messages.
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as err:
        raise DataError(path, f"not a readable DICOM file: {err}") from None
    if "PixelData" not in ds:
        raise DataError(path, "DICOM file has no pixel data (not an image?)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(path, f"multi-frame DICOM ({ds.NumberOfFrames} frames); expected one film")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        raw = ds.pixel_array
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise DataError(
            path,
            f"cannot decode DICOM pixel data ({name}): {err}; the file may be truncated or "
            "need a decoder plugin (pylibjpeg, gdcm)",
        ) from None
    spacing = _dicom_spacing(ds)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if raw.ndim == 3 and raw.shape[-1] == 3:  # pydicom already converted YBR to RGB
            return _to_gray(path, raw, "image"), spacing
        raise DataError(path, f"unsupported DICOM photometric interpretation {photometric!r}")
    if raw.ndim != 2:
        raise DataError(path, f"unexpected DICOM pixel array shape {raw.shape}")
    try:
        values = apply_modality_lut(raw, ds)
        shown = _apply_voi(ds, values)
    except (ValueError, NotImplementedError, KeyError, AttributeError, TypeError) as err:
        raise DataError(path, f"invalid DICOM LUT/windowing attributes: {err}") from None
    image, white = shown if shown is not None else _without_voi(path, ds, values)
    if photometric == "MONOCHROME1":  # minimum = white: flip so that bone is bright
        image = (white - image.astype(np.int64)).astype(image.dtype)
    return image, spacing


def _apply_voi(ds, values: np.ndarray) -> tuple[np.ndarray, int] | None:
    """VOI LUT (preferred, as pydicom's default) or window centre/width, rescaled to the
    full uint16 range; None when the file has no VOI transform. Returns (image, white)."""
    from pydicom.pixels import apply_voi, apply_windowing

    seq = ds.get("VOILUTSequence")
    has_lut = bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if has_lut:
        # The LUT's real output range (descriptors often overstate the bit depth).
        descriptor = [int(v) for v in seq[0].LUTDescriptor]
        entries = descriptor[0] or 2**16
        table = apply_voi(np.arange(descriptor[1], descriptor[1] + entries), ds)
        lo, hi = float(table.min()), float(table.max())
        out = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
    elif has_window:
        # Far below/above the window the function saturates at pydicom's output range.
        lo, hi = (float(v) for v in apply_windowing(np.array([-1e12, 1e12]), ds))
        out = apply_windowing(np.asarray(values, np.float64), ds)
    else:
        return None
    if hi == lo:
        return np.zeros(out.shape, np.uint16), 65535
    scaled = np.clip((out - lo) / (hi - lo), 0.0, 1.0) * 65535.0
    return np.rint(scaled).astype(np.uint16), 65535


def _without_voi(path: Path, ds, values: np.ndarray) -> tuple[np.ndarray, int]:
    """No windowing in the file: keep stored values when they fit (a 12-bit film stays
    12-bit, white = 4095), else map the Modality LUT's output range linearly onto uint16."""
    from pydicom.pixels import apply_modality_lut

    bits = int(ds.get("BitsStored", 16))
    if not 1 <= bits <= 32:
        raise DataError(path, f"unexpected bit depth ({bits} bits stored)")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    stored = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = np.asarray(apply_modality_lut(np.array(stored), ds), np.float64)
    lo, hi = float(ends.min()), float(ends.max())
    integral = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
    if lo >= 0 and hi <= 65535 and integral:
        dtype = np.uint8 if hi <= 255 else np.uint16
        return np.clip(values, 0, hi).astype(dtype), int(hi)
    if hi == lo:
        return np.zeros(values.shape, np.uint16), 65535
    scaled = np.clip((np.asarray(values, np.float64) - lo) / (hi - lo), 0.0, 1.0) * 65535.0
    return np.rint(scaled).astype(np.uint16), 65535


def _dicom_spacing(ds) -> tuple[float, float] | None:
    """(row, col) spacing in mm: PixelSpacing (calibrated at the patient) over
    ImagerPixelSpacing (at the detector) when both exist."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is None:
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return row, col
    return None


# ----------------------------------------------------------------------------- errors


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(choices_message("on_error", on_error, ON_ERROR))


def handle_error(err: DataError, on_error: str, skipped: list | None) -> None:
    """`raise` re-raises; `skip` records (path, problem) and warns. Never silent."""
    if on_error == "raise":
        raise err
    log.warning("skipping %s", err)
    if skipped is not None:
        skipped.append((err.path or "", err.problem))


def load_parallel(
    items: Iterable[T],
    load: Callable[[T], R],
    on_error: str,
    skipped: list | None,
    workers: int | None = None,
) -> list[R]:
    """Run `load` over items in a thread pool (OpenCV/zlib release the GIL), keeping input
    order; DataErrors are handled in that order so `raise` always names the first bad file."""
    items = list(items)
    workers = workers or min(8, os.cpu_count() or 1)

    def attempt(item: T) -> R | DataError:
        try:
            return load(item)
        except DataError as err:
            return err

    if workers <= 1 or len(items) <= 1:
        results = [attempt(item) for item in items]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(attempt, items))
    out: list[R] = []
    for result in results:
        if isinstance(result, DataError):
            handle_error(result, on_error, skipped)
        else:
            out.append(result)
    return out
