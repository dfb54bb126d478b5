"""`spineseg-report run_dir=<dir>`: build the paper-style report of a run (conf/report.yaml).

It reads only the run's own files, so it works on a run whose training config no longer
composes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from spineseg.cli.common import hydra_app
from spineseg.config import APPS_DIR

USAGE = "usage: spineseg-report run_dir=<dir>"


def _report(cfg: DictConfig) -> Path:
    from spineseg.report.report import build_report, distance_unit, load_run
    from spineseg.report.tables import rules_table

    path = build_report(Path(str(cfg.run_dir)))
    data = load_run(path.parent.parent)
    if data.results is not None:
        print(rules_table(data.results, distance_unit(data)).to_markdown(index=False))
    else:
        print("no ensemble results yet: run spineseg-ensemble first")
    print(f"\nreport: {path}")
    return path


main = hydra_app("report", _report, USAGE, APPS_DIR)


if __name__ == "__main__":
    sys.exit(main())
