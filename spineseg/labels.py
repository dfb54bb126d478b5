"""From level values to what a target learns; the names themselves are in `spineseg.names`.

A source's label map holds *level values*: 0 is background and value `v` is the vertebra
`LEVELS[v - 1]`, whichever vertebrae the source happens to label (AASCE labels Th1..L5, the
phantoms C5..L5, a folder dataset what it declares). A source that only has the region
marks it with value 1 and `Sample.binary_label`. Targets are derived from level values in
one place (`target_masks`), so every stage agrees on what "Th8..Th11" means.
"""

from __future__ import annotations

import numpy as np

from spineseg.errors import ConfigError, DataError, choices_message
from spineseg.names import (
    FIRST_TARGET_VALUE,
    LEVELS,
    NUM_TARGET,
    TARGET_LEVELS,
    TARGET_VALUES,
    TARGETS,
)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(choices_message("target", target, list(TARGETS)))
    return target


def level_value(name: str) -> int:
    """'Th8' -> its label value (15). 'T8' is read as Th8, as AASCE and many papers write it."""
    key = str(name).strip()
    if key[:1] == "T" and key[1:].isdigit():
        key = "Th" + key[1:]
    if key not in LEVELS:
        raise ConfigError(choices_message("vertebra level", str(name), list(LEVELS)))
    return LEVELS.index(key) + 1


def level_values(names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Label values of `names`, which must be distinct and in top-to-bottom order."""
    values = np.array([level_value(n) for n in names], np.uint8)
    if len(values) and (np.diff(values.astype(int)) <= 0).any():
        raise ConfigError(
            f"levels {list(names)} must be distinct and ordered top to bottom (e.g. Th8..Th11)"
        )
    return values


def vertebra_labels(levels: np.ndarray) -> np.ndarray:
    """Level values -> 0 background, 1..4 = Th8..Th11 (other vertebrae are background)."""
    out = levels.astype(np.int16) - (FIRST_TARGET_VALUE - 1)
    out[(out < 1) | (out > NUM_TARGET)] = 0
    return out.astype(np.uint8)


def region_mask(levels: np.ndarray) -> np.ndarray:
    return ((levels >= TARGET_VALUES[0]) & (levels <= TARGET_VALUES[-1])).astype(np.uint8)


def target_masks(
    levels: np.ndarray, binary: np.ndarray, target: str, ids: list[str] | None = None
) -> np.ndarray:
    """(N,H,W) level values -> what `target` learns and what its metrics use.

    binary: (N,) films whose source only had the region (their value 1 is the region)."""
    check_target(target)
    binary = np.asarray(binary, bool)
    if target == "region":
        out = region_mask(levels)
        if binary.any():
            out[binary] = (levels[binary] > 0).astype(np.uint8)
        return out
    if binary.any():
        bad = ids[int(np.argmax(binary))] if ids else None
        raise DataError(
            bad, f"target={target} needs per-vertebra masks; this film's mask is binary (region)"
        )
    if target == "vertebrae":
        return vertebra_labels(levels)
    only_target = levels.size and not bool(((levels > 0) & (region_mask(levels) == 0)).any())
    if only_target:
        raise DataError(
            None,
            "target=levels learns every labelled vertebra, but this dataset labels only "
            f"{', '.join(TARGET_LEVELS)}: use target=vertebrae or target=region, or declare "
            "more levels (folder: data.source_kwargs.levels)",
        )
    return levels
