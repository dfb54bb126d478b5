"""Ensemble results to W&B: tables and figures, offline unless WANDB_MODE says otherwise.

Films are patient data, so the overlay gallery is logged only with `log_images: true`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spineseg.utils.wandb import wandb_mode

log = logging.getLogger(__name__)


def _mode(wcfg: Mapping[str, Any]) -> str:
    """The training runs' rule (spineseg.utils.wandb.wandb_mode): offline unless opted in."""
    return wandb_mode(wcfg.get("mode"))


def _table(df: pd.DataFrame) -> Any:
    import wandb

    clean = df.copy()
    for col in clean.columns:
        if clean[col].dtype.kind == "f":
            clean[col] = clean[col].where(np.isfinite(clean[col]), None)
    return wandb.Table(dataframe=clean)


def log_results(
    run_dir: str | Path,
    wcfg: Mapping[str, Any],
    results: pd.DataFrame,
    per_image: pd.DataFrame,
    figures: Mapping[str, Path],
    galleries: Mapping[str, Path] | None = None,
    selection: Mapping[str, Any] | None = None,
) -> Path | None:
    """One `job_type="ensemble"` run under `<run_dir>/wandb/`; returns its local folder."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = _mode(wcfg)
    run = wandb.init(
        project=wcfg.get("project") or "spineseg",
        # the sweep's group, as the training runs name it (logger/wandb.yaml: <name>-<run>)
        group=wcfg.get("group") or f"{Path(run_dir).parent.name}-{Path(run_dir).name}",
        job_type="ensemble",
        name=f"ensemble-{Path(run_dir).name}",
        dir=str(run_dir),
        mode=mode,  # type: ignore[arg-type]
        config={"selection": dict(selection or {})},
        reinit="create_new",
    )
    try:
        run.log({"ensemble/results": _table(results), "ensemble/per_image": _table(per_image)})
        for name, path in figures.items():
            run.log({f"ensemble/{name}": wandb.Image(str(path))})
        if wcfg.get("log_images"):
            for name, path in (galleries or {}).items():
                run.log({f"ensemble/{name}": wandb.Image(str(path))})
        for row in results.itertuples(index=False):
            for key in ("dice_mean", "level_error_rate"):
                value = getattr(row, key, float("nan"))
                if np.isfinite(value):
                    run.summary[f"{row.split}/{row.method}/{key}"] = float(value)
        local = Path(run.dir).parent
    finally:
        run.finish()
    log.info("W&B ensemble run (%s) in %s", mode, local)
    return local
