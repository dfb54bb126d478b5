"""Run the ensemble when a Hydra multirun sweep ends (wired in conf/train.yaml as
`hydra.callbacks.ensemble`), so `spineseg-train -m sweep=...` ends with the comparison."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class EnsembleOnMultirunEnd(Callback):
    """Ensemble `<sweep dir>/predictions` after the last job; never fails the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        ens = OmegaConf.select(config, "ensemble")
        if ens is None or not ens.get("enabled", True):
            log.info("ensemble disabled: skipped")
            return
        try:
            from spineseg.ensemble.evaluate import run_ensemble

            run_dir = OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=True)
            results = run_ensemble(run_dir, ens)
            log.info(
                "ensemble of %s: %d result rows in %s/ensemble", run_dir, len(results), run_dir
            )
        except Exception as err:  # the models are trained; a failed summary must not undo that
            log.error("ensemble failed: %s: %s", type(err).__name__, err)
            log.debug("ensemble failure", exc_info=True)
