"""Paths a run directory records about itself, read after it was moved or copied."""

from __future__ import annotations

import os
from pathlib import Path


def rebased(path: str | Path, recorded_root: str | Path | None, root: str | Path) -> Path:
    """`path`, written when the run directory was `recorded_root`, as the same place under
    `root`, where the run directory is now; a path outside it comes back unchanged.

    `recorded_root` may be relative (to the cwd of the training, unknown now): it then
    matches wherever its parts appear in an absolute `path`, outermost first."""
    p = Path(os.path.normpath(path))
    if not recorded_root:
        return p
    r = Path(os.path.normpath(recorded_root)).parts
    parts = p.parts
    starts = [0] if Path(recorded_root).is_absolute() else range(len(parts) - len(r) + 1)
    for i in starts:
        if parts[i : i + len(r)] == r:
            return Path(root, *parts[i + len(r) :])
    return p
