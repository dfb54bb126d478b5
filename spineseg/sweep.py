"""Hydra callback that summarises a sweep: which models completed, which failed and why."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from spineseg.ensemble.store import PredictionStore
from spineseg.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def summarize_sweep(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per model in the store, written to sweep_summary.{json,md}."""
    store = PredictionStore(run_dir)
    rows = []
    for name in store.models(status=None):
        m = store.read_manifest(name) or {}
        rows.append(
            {
                "model": name,
                "status": m.get("status", "unknown"),
                "val_dice": (m.get("val_metrics") or {}).get("dice"),
                "elapsed_s": m.get("elapsed_s"),
                "error": m.get("error"),
            }
        )
    lines = ["| model | status | val dice | time (s) | error |", "|---|---|---|---|---|"]
    for r in rows:
        dice = f"{r['val_dice']:.4f}" if isinstance(r["val_dice"], float) else "-"
        err = (r["error"] or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {r['model']} | {r['status']} | {dice} | {r['elapsed_s'] or '-'} | {err} |")
    atomic_write_json(Path(run_dir) / "sweep_summary.json", rows)
    atomic_write_text(Path(run_dir) / "sweep_summary.md", "\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = config.hydra.sweep.dir
        rows = summarize_sweep(run_dir)
        failed = [r for r in rows if r["status"] != "complete"]
        done = len(rows) - len(failed)
        print(f"\nsweep {run_dir}: {done} of {len(rows)} models complete", flush=True)
        for r in failed:
            print(f"  {r['status'].upper()}: {r['model']}: {r['error']}", flush=True)
