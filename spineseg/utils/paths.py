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


def not_a_run(run_dir: str | Path) -> str | None:
    """Why `run_dir` is not a run directory (missing, or no prediction store), pointing at
    the run it lies inside (a job, store or ensemble folder given instead) or the runs below
    it (a name's folder given instead); None when it is one."""
    from spineseg.names import PREDICTIONS_DIR

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return f"run_dir {run_dir} does not exist"
    if (run_dir / PREDICTIONS_DIR).is_dir():
        return None
    problem = f"{run_dir / PREDICTIONS_DIR} does not exist: no predictions in run_dir {run_dir}"
    inside = next((p for p in run_dir.parents if (p / PREDICTIONS_DIR).is_dir()), None)
    if inside is not None:
        return f"{problem}; it lies inside the run {inside}: run_dir={inside}"
    below = sorted(
        p.parent for depth in ("*", "*/*") for p in run_dir.glob(f"{depth}/{PREDICTIONS_DIR}")
    )
    if below:
        more = f" (or one of {len(below) - 1} more)" if len(below) > 1 else ""
        return f"{problem}; runs below it: run_dir={below[0]}{more}"
    return problem
