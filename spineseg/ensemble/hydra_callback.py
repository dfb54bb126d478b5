"""Run the ensemble when a Hydra multirun sweep ends (wired in conf/train.yaml as
`hydra.callbacks.ensemble`), so `spineseg-train -m sweep=...` ends with the comparison."""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class EnsembleOnMultirunEnd(Callback):
    """Ensemble `<sweep dir>/predictions` after the last job.

    A failure is one line, and the sweep then exits 1: the trained models stay as they
    are, and `spineseg-ensemble run_dir=...` retries just this step. Hydra calls the
    callbacks' `on_multirun_end` in reverse order, and this one is listed first in
    conf/train.yaml, so the sweep's summary is written before it can exit."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        ens = OmegaConf.select(config, "ensemble")
        if ens is None or not ens.get("enabled", True):
            log.info("ensemble disabled: skipped")
            return
        run_dir = OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=True)
        nothing_finished(run_dir)
        try:
            from spineseg.ensemble.evaluate import run_ensemble

            results = run_ensemble(run_dir, ens)
        except Exception as err:
            log.debug("ensemble failure", exc_info=True)
            print(
                f"error: the ensemble of {run_dir} failed: {type(err).__name__}: {err}; the "
                f"models are kept, retry with spineseg-ensemble run_dir={run_dir}",
                file=sys.stderr,
            )
            sys.exit(1)
        log.info("ensemble of %s: %d result rows in %s/ensemble", run_dir, len(results), run_dir)


def nothing_finished(run_dir: str) -> None:
    """When no model of the sweep finished there is nothing to ensemble: the last line says
    why the models failed (their errors, once each), not that the store is empty."""
    from spineseg.ensemble.store import PredictionStore

    store = PredictionStore(run_dir)
    manifests = [store.read_manifest(m) or {} for m in store.models(status=None)]
    if not manifests or store.models():
        return  # no model folder, or finished models: the ensemble's own message applies
    errors = sorted({m["error"] for m in manifests if m.get("error")})
    reason = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    print(
        f"error: none of the {len(manifests)} model(s) of {run_dir} finished, so there is "
        f"nothing to ensemble: {reason or 'see sweep_summary.md'}",
        file=sys.stderr,
    )
    sys.exit(1)
