"""The npz internals behind the prediction store: reading members in place, by position.

`np.load` would read a whole member into memory; the store instead memory-maps each stored
(uncompressed) `.npy` member where it lies in the zip, and reads a chunk of rows with one
positioned read (`os.preadv`), so that evaluating N images needs memory for one chunk. The
store's public API (`store.PredictionStore`, `store.iter_raw_chunks`...) is all a caller uses.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from spineseg.errors import StoreError

__all__ = ["member_names", "open_zip", "read_ids", "read_member", "read_rows", "read_rows_into"]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise StoreError(f"{path}: corrupt or truncated npz ({err})") from err


def member_names(path: Path) -> set[str]:
    with open_zip(path) as zf:
        return {n.removesuffix(".npy") for n in zf.namelist()}


def read_ids(path: Path) -> np.ndarray:
    ids = read_member(path, "ids", False)
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise StoreError(f"{path}: ids must be a 1-D string array, got {ids.dtype} {ids.shape}")
    return ids.astype(str)


def read_member(path: Path, name: str, mmap: bool) -> np.ndarray:
    """One array of an npz; memory-mapped in place when stored uncompressed."""
    member = f"{name}.npy"
    try:
        with open_zip(path) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise StoreError(
                    f"{path}: no {name!r} array (has {', '.join(sorted(zf.namelist()))})"
                ) from None
            if mmap and info.compress_type == zipfile.ZIP_STORED:
                mapped = _memmap_member(path, zf, info)
                if mapped is not None:
                    return mapped
            with zf.open(info) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
    except StoreError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as err:
        raise StoreError(f"{path}: corrupt or truncated npz member {name!r} ({err})") from err


def _memmap_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray | None:
    """Map a stored .npy member: its data start is the local header + name + extra field
    (read from the local header; it can differ from the central directory's) + npy header."""
    fh = zf.fp
    if fh is None:
        return None
    fh.seek(info.header_offset)
    sig, *_rest, name_len, extra_len = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
    if sig != b"PK\x03\x04":
        raise StoreError(f"{path}: bad zip local header for {info.filename}")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    fh.seek(start)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        return None
    if dtype.hasobject:
        raise StoreError(f"{path}: {info.filename} holds Python objects")
    offset = fh.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset - start + nbytes != info.file_size or offset + nbytes > path.stat().st_size:
        raise StoreError(f"{path}: {info.filename} is truncated")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def read_rows_into(arr: np.ndarray, sl: slice, out: np.ndarray) -> None:
    """`out[...] = arr[sl]`; a whole-file memmap of the same dtype is read straight into
    `out` with one positioned read (see `read_rows` for why not through the mapping)."""
    if not (
        isinstance(arr, np.memmap)
        and isinstance(arr.base, mmap.mmap)
        and arr.flags.c_contiguous
        and arr.filename
        and arr.dtype == out.dtype
        and out.flags.c_contiguous
    ):
        np.copyto(out, read_rows(arr, sl))
        return
    row = out.nbytes // max(1, out.shape[0])
    view = memoryview(out.reshape(-1).view(np.uint8))
    offset, done = arr.offset + sl.start * row, 0
    with open(arr.filename, "rb", buffering=0) as fh:
        while done < out.nbytes:
            got = os.preadv(fh.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise StoreError(
                    f"{arr.filename}: truncated (expected {out.nbytes} bytes from image "
                    f"{sl.start}, read {done})"
                )
            done += got


def read_rows(arr: np.ndarray, sl: slice | np.ndarray) -> np.ndarray:
    """`arr[sl]`, but a contiguous slice of a whole-file memmap is read with one pread.

    Pages touched through a mapping stay mapped, and count in the process's RSS, until the
    map is closed: slicing the memmap would make resident memory grow with N although the
    data are only the page cache. Reading the byte range keeps it at one chunk."""
    contiguous = isinstance(sl, slice) and sl.step in (None, 1)
    if not (
        contiguous
        and isinstance(arr, np.memmap)
        and isinstance(arr.base, mmap.mmap)
        and arr.flags.c_contiguous
        and arr.filename
    ):
        return arr[sl]
    start, stop, _ = sl.indices(arr.shape[0])
    row = int(np.prod(arr.shape[1:], dtype=np.int64))
    count = max(0, stop - start) * row
    data = np.fromfile(
        arr.filename,
        dtype=arr.dtype,
        count=count,
        offset=arr.offset + start * row * arr.dtype.itemsize,
    )
    if data.size != count:
        raise StoreError(
            f"{arr.filename}: truncated (expected {count} values from image "
            f"{start}, read {data.size})"
        )
    return data.reshape(max(0, stop - start), *arr.shape[1:])
