"""`spineseg-report run_dir=<dir>` (or a bare path): build the paper-style report of a run.

Plain key=value parsing rather than Hydra: the report has one argument and must work on a
run directory whose config may no longer compose.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from spineseg.cli.common import one_line_errors
from spineseg.errors import ConfigError


def parse_args(argv: Sequence[str]) -> Path:
    """`run_dir=<dir>` or a single bare path; anything else is a one-line ConfigError."""
    run_dir: str | None = None
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "run_dir":
            run_dir = value
        elif not sep and run_dir is None:
            run_dir = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}; usage: spineseg-report run_dir=<dir>")
    if not run_dir:
        raise ConfigError("run_dir is required: spineseg-report run_dir=<dir>")
    return Path(run_dir)


@one_line_errors
def run(argv: Sequence[str]) -> Path:
    from spineseg.report.report import build_report, distance_unit, load_run, rules_table

    path = build_report(parse_args(argv))
    data = load_run(path.parent.parent)
    if data.results is not None:
        table = rules_table(data.results, distance_unit(data))
        print(table.to_markdown(index=False))
    else:
        print("no ensemble results yet: run spineseg-ensemble first")
    print(f"\nreport: {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    run(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
