"""Vertebra levels, label values and training targets: the names every module imports.

A source's label map holds *level values*: 0 is background and value `v` is the vertebra
`LEVELS[v - 1]`, whichever vertebrae the source happens to label (AASCE labels Th1..L5, the
phantoms C5..L5, a folder dataset what it declares). A source that only has the region
marks it with value 1 and `Sample.binary_label`. Targets are derived from level values in
one place (`target_masks`), so every stage agrees on what "Th8..Th11" means.
"""

from __future__ import annotations

import numpy as np

from spineseg.errors import ConfigError, DataError, choices_message

#: Every vertebra a label map may name, top to bottom; label value = index + 1.
LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"Th{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
)
#: The study's region: Th8, Th9, Th10, Th11.
TARGET_LEVELS: tuple[str, ...] = ("Th8", "Th9", "Th10", "Th11")
NUM_TARGET = len(TARGET_LEVELS)

#: What a model learns: the binary region (the paper), the four target vertebrae, or
#: every labelled vertebra (the region is derived from the Th8..Th11 classes).
TARGETS: tuple[str, ...] = ("region", "vertebrae", "levels")
#: Channels of what is stored for a target (and of the network, except for `levels`, whose
#: channels depend on its encoding: `spineseg.models.levels.channels`).
CHANNELS: dict[str, int] = {"region": 1, "vertebrae": 1 + NUM_TARGET}
#: Channels stored (and voted on) per target: levels models store the derived region.
STORED_TARGET: dict[str, str] = {"region": "region", "vertebrae": "vertebrae", "levels": "region"}

#: Default meaning of a folder mask's values 1..4 (documented in the README).
DEFAULT_MASK_LEVELS: tuple[str, ...] = TARGET_LEVELS


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


TARGET_VALUES: np.ndarray = level_values(TARGET_LEVELS)
FIRST_TARGET_VALUE = int(TARGET_VALUES[0])


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
