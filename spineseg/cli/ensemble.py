"""`spineseg-ensemble run_dir=<dir> [ensemble.top_k=5 ...]`: a thin Hydra entry point around
`spineseg.ensemble.evaluate.run_ensemble` (select on val, evaluate test/external)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

import spineseg  # noqa: F401  (registers the OmegaConf resolvers)
from spineseg.cli.common import CONF_DIR, one_line_errors
from spineseg.errors import ConfigError


@one_line_errors
def _run(cfg: DictConfig) -> None:
    from spineseg.ensemble.evaluate import run_ensemble
    from spineseg.report.tables import console_table

    try:
        run_dir = Path(cfg.run_dir)
    except MissingMandatoryValue:
        raise ConfigError("run_dir is required: spineseg-ensemble run_dir=<dir>") from None
    results = run_ensemble(run_dir, cfg.ensemble)
    print(console_table(results))
    print(
        f"\nresults: {run_dir / 'ensemble'} (results.csv, results.md, results.json, "
        "per_image.csv, selection.json, figures/)"
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run_ensemble")
def main(cfg: DictConfig) -> None:
    _run(cfg)


if __name__ == "__main__":
    sys.exit(main())
