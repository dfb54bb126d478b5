"""Atomic writes: a file goes to a temporary sibling, fsync, then os.replace; a set of files
(`ensemble/`, `report/`) goes to a staged sibling folder that is swapped in whole.

A crash (or SIGKILL) mid-write leaves either the old file or set, or the new one, never a
torn file or a mixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any file
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def atomic_savez(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez (uncompressed, so members can be memory-mapped) written atomically."""
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or
    the file system cannot (then the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_dir(final: str | Path) -> None:
    """After a kill between the two renames of the fallback swap, put the old set back; drop
    staged sets that were never published."""
    final = Path(final)
    if not final.exists() and _old(final).is_dir():
        os.replace(_old(final), final)
    for stale in final.parent.glob(f".{final.name}.new-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty sibling folder to write a whole set of outputs into; on success it
    replaces `final` in one step, on failure it is removed and `final` is as it was.

    Readers see the old complete set or the new one, never a mixture."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    os.chmod(staged, 0o777 & ~_UMASK)
    try:
        yield staged
        if final.exists() and _exchange(staged, final):
            shutil.rmtree(staged, ignore_errors=True)  # now holds the old set
            return
        if final.exists():
            shutil.rmtree(_old(final), ignore_errors=True)
            os.replace(final, _old(final))
        os.replace(staged, final)
        shutil.rmtree(_old(final), ignore_errors=True)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        recover_dir(final)
        raise


def file_digest(path: str | Path, block: int = 1 << 22) -> str:
    """`crc32:<hex>` of a file's bytes: cheap (GB/s), and catches a flipped or torn byte in
    a stored prediction before it is scored."""
    import zlib

    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def hold_lock(folder: str | Path, what: str) -> IO[Any]:
    """Take `folder/.lock` for this process (released when it exits or closes the file);
    a second holder gets one line naming the folder and the process that holds it.

    flock, not a marker file: a killed process never leaves a stale lock behind."""
    import fcntl

    from spineseg.errors import RefusedError

    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115  (held for the process's lifetime)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RefusedError(
            f"{folder} is in use by {holder}: {what} is already running there; wait for it "
            "to finish, or use another run name (run=...)"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh
