"""`spineseg-ensemble run_dir=<dir> [ensemble.top_k=5 ...]`: a thin Hydra entry point around
`spineseg.ensemble.evaluate.run_ensemble` (select on val, evaluate test/external)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

import spineseg  # noqa: F401  (registers the OmegaConf resolvers)
from spineseg.cli.common import hydra_app

USAGE = "usage: spineseg-ensemble run_dir=<dir> [ensemble.top_k=5 ...]"


def _ensemble(cfg: DictConfig) -> None:
    from spineseg.data.cascade import CROPS_CSV
    from spineseg.ensemble.evaluate import run_ensemble
    from spineseg.report.tables import console_table

    run_dir = Path(str(cfg.run_dir))
    results = run_ensemble(run_dir, cfg.ensemble)
    print(console_table(results))
    print(
        f"\nresults: {run_dir / 'ensemble'} (results.csv, results.md, results.json, "
        "per_image.csv, selection.json, figures/)"
    )
    if (run_dir / CROPS_CSV).is_file():
        print(
            "a cascade: these scores are inside each film's crop; `spineseg-score "
            f"run_dir={run_dir}` scores the masks pasted back on the whole films"
        )


main = hydra_app("run_ensemble", _ensemble, USAGE)


if __name__ == "__main__":
    sys.exit(main())
