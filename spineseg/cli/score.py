"""`spineseg-score run_dir=<dir> [split=val] [rules=[soft]] [against=<run>] [device=auto]`:
score what `spineseg-predict` delivers on the run's own held-out films, at the films'
resolution (`spineseg.report.film_scores`); the options and defaults are conf/apps/score.yaml.

Runs with different working sizes, and a cascade against a whole-film run, compare here;
`ensemble/results.csv` scores each at its own working resolution. `against=<run>` adds the
paired difference of each rule against the same rule of another run already scored so.
`label_offsets=<csv>` (written by `spineseg-validate-data level_offsets=<csv>`) adds each
method's level-error rate on the films whose labels agree with their patient's other films,
and on those whose labels do not. `level_corrections=<csv>` scores against labels renamed by
another set of corrections than training's (a reader's answers in a `review.csv`), `none`
against the labels as given, into `film_scores/<split>+labels_<name>/` beside the run's own.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from spineseg.checks import check_whole
from spineseg.cli.common import flag, hydra_app
from spineseg.config import APPS_DIR
from spineseg.errors import ConfigError

USAGE = "usage: spineseg-score run_dir=<dir> [split=val] [rules=[soft]] [key=value ...]"


def _score(cfg: DictConfig) -> str:
    from spineseg.report.film_scores import (
        against,
        against_text,
        agreement_text,
        by_label_agreement,
        label_verdicts,
        score_films,
        write_film_scores,
    )
    from spineseg.report.readme_table import readme_table

    rules = OmegaConf.to_object(cfg.rules) if OmegaConf.is_list(cfg.rules) else cfg.rules
    if not isinstance(rules, list) or not rules or not all(isinstance(r, str) for r in rules):
        raise ConfigError(f"rules={cfg.rules!r} must be a list of rule names, e.g. rules=[soft]")
    check_whole("batch_size", cfg.batch_size, 1)
    films = (
        None
        if cfg.label_offsets is None
        else label_verdicts(str(cfg.label_offsets), str(cfg.run_dir), str(cfg.split))
    )
    per_image, results, meta = score_films(
        str(cfg.run_dir),
        str(cfg.split),
        rules,
        str(cfg.device),
        None if cfg.data_root is None else str(cfg.data_root),
        int(cfg.batch_size),
        flag(cfg, "atlas"),
        _labels(cfg.level_corrections),
    )
    compared = []
    if cfg.against is not None:
        compared = against(per_image, str(cfg.against), str(cfg.split), rules)
        meta["against"] = compared
    agreeing = []
    if films is not None:
        agreeing = by_label_agreement(per_image, films)
        meta["label_agreement"] = {"offsets": str(cfg.label_offsets), "rows": agreeing}
    out = write_film_scores(str(cfg.run_dir), per_image, results, meta)
    table = readme_table(results, levels=True, hd95=True, paired=True)
    print(table)
    if compared:
        print("\n" + against_text(compared))
    if agreeing:
        print("\nby the level check of the labels (label_offsets):\n" + agreement_text(agreeing))
    print(f"\nat the films' resolution: {out}")
    return table


def _labels(value: object) -> str:
    """`level_corrections=run|none|<csv>`, checked before any film is read."""
    from spineseg.report.film_scores import AS_GIVEN, RUN_LABELS

    if value is None:
        return AS_GIVEN
    if value in (RUN_LABELS, AS_GIVEN):
        return str(value)
    from spineseg.data.level_check import read_corrections

    read_corrections(str(value))  # a missing or foreign file: one line, now
    return str(value)


main = hydra_app("score", _score, USAGE, APPS_DIR)


if __name__ == "__main__":
    sys.exit(main())
