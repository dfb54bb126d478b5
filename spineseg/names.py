"""The project's names, defined once: splits, vertebra levels and label values, targets, and
how the results name their methods. Every module imports them from here.

A label map holds *level values*: 0 is background and value `v` is the vertebra
`LEVELS[v - 1]` (`spineseg.labels` derives the targets from them).
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------- splits
TRAIN, VAL, TEST, EXTERNAL = "train", "val", "test", "external"
#: A dataset's own division of its films, by patient (splits.csv, a folder's split column).
DATA_SPLITS: tuple[str, ...] = (TRAIN, VAL, TEST)
#: What the prediction store holds and the ensemble scores: `val` to choose on, `test` and
#: the external dataset to report.
STORED_SPLITS: tuple[str, ...] = (VAL, TEST, EXTERNAL)

# ---------------------------------------------------------------------- levels and labels
#: Every vertebra a label map may name, top to bottom; label value = index + 1.
LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"Th{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
)
#: The study's region: Th8, Th9, Th10, Th11.
TARGET_LEVELS: tuple[str, ...] = ("Th8", "Th9", "Th10", "Th11")
NUM_TARGET = len(TARGET_LEVELS)
#: Their level values (Th8 = 15 ... Th11 = 18).
TARGET_VALUES: np.ndarray = np.array([LEVELS.index(n) + 1 for n in TARGET_LEVELS], np.uint8)
FIRST_TARGET_VALUE = int(TARGET_VALUES[0])
#: Default meaning of a folder mask's values 1..4 (documented in the README).
DEFAULT_MASK_LEVELS: tuple[str, ...] = TARGET_LEVELS
#: The store's per-vertebra truth: 0 = background, 1..4 = Th8..Th11.
MAX_LABEL = NUM_TARGET

# ---------------------------------------------------------------------- a run directory
#: The prediction store (every model's probabilities and the truth): what makes a folder a
#: run directory.
PREDICTIONS_DIR = "predictions"
#: `spineseg-ensemble`'s output set (swapped in whole), relative to the run directory.
ENSEMBLE_DIR = "ensemble"
#: What it chose on validation (models, weights, thresholds, ...): what predict, export
#: and a cascade's stage 2 load.
SELECTION = f"{ENSEMBLE_DIR}/selection.json"
#: The temperatures fitted on validation, per model and rule, and the ECE per split.
CALIBRATION = f"{ENSEMBLE_DIR}/calibration.json"
#: The quality flags' normal ranges (validation) and how well they catch poor results.
QUALITY = f"{ENSEMBLE_DIR}/quality.json"
#: `spineseg-score`'s sets: what predict delivers, scored at the films' own resolution,
#: one folder per split (`film_scores/val/results.csv`, ...).
FILM_SCORES_DIR = "film_scores"

# ---------------------------------------------------------------------- targets
#: What a model learns: the binary region (the paper), the four target vertebrae, or
#: every labelled vertebra (the region is derived from the Th8..Th11 classes).
TARGETS: tuple[str, ...] = ("region", "vertebrae", "levels")
#: Channels of what is stored for a target (and of the network, except for `levels`, whose
#: channels depend on its encoding: `spineseg.models.levels.channels`).
CHANNELS: dict[str, int] = {"region": 1, "vertebrae": 1 + NUM_TARGET}
#: Channels stored (and voted on) per target: levels models store the derived region.
STORED_TARGET: dict[str, str] = {"region": "region", "vertebrae": "vertebrae", "levels": "region"}

# ---------------------------------------------------------------------- result methods
#: The best single model on validation, listed beside the rules.
BEST = "best_single"
#: The film-blind reference row of `spineseg-score` (spineseg/ensemble/baseline.py).
ATLAS = "atlas"
#: Each selected model's own row: `model:<name>`.
MODEL_PREFIX = "model:"
#: A post-processed method: `<method>+<post-processing>` (e.g. `soft+spine`).
POST_SEP = "+"


def model_method(model: str) -> str:
    """The results' name of one model's own predictions."""
    return MODEL_PREFIX + model


def post_method(method: str, post: str) -> str:
    """The results' name of `method` after post-processing `post` (`none`: unchanged)."""
    return method if post == "none" else f"{method}{POST_SEP}{post}"
