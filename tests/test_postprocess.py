"""Anatomical post-processing: what it keeps, the four ordered bodies, the validation choice."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ensemble_fixtures import make_store

from spineseg.ensemble import metrics, postprocess
from spineseg.ensemble.evaluate import run_ensemble
from spineseg.errors import ConfigError


def _column() -> np.ndarray:
    """Four bodies 8 rows tall with 2-row discs between them, as the truth is drawn."""
    region = np.zeros((80, 30), np.uint8)
    for k in range(4):
        region[10 + 10 * k : 18 + 10 * k, 10:20] = 1
    return region


def test_spine_keeps_the_column_and_drops_stray_blobs() -> None:
    region = _column()
    noisy = region.copy()
    noisy[2:5, 1:4] = 1  # a blob off the spine (left, above)
    noisy[70:76, 12:18] = 1  # a blob below the column, more than a pitch away
    noisy[13:15, 13:15] = 0  # a hole inside Th8
    out = postprocess.apply("spine", noisy)
    np.testing.assert_array_equal(out, region)  # discs kept apart, hole filled, blobs gone
    assert out.dtype == noisy.dtype


def test_spine_is_the_identity_on_clean_masks_and_none_changes_nothing() -> None:
    batch = np.stack([_column(), np.zeros((80, 30), np.uint8)])
    np.testing.assert_array_equal(postprocess.apply("spine", batch), batch)
    noisy = batch.copy()
    noisy[0, 0, 0] = 1
    assert postprocess.apply("none", noisy) is noisy
    with pytest.raises(ConfigError, match="valid choices: none, spine"):
        postprocess.apply("smooth", noisy)


def test_vertebrae_become_four_ordered_bodies() -> None:
    truth = np.zeros((1, 80, 30), np.uint8)
    for k in range(4):
        truth[0, 10 + 10 * k : 18 + 10 * k, 10:20] = k + 1
    axis = metrics.spine_axis(truth)
    pred = truth.copy()
    pred[truth == 2], pred[truth == 3] = 3, 2  # Th9 and Th10 swapped
    pred[0, 60:63, 2:5] = 1  # a second, stray piece of Th8
    assert metrics.level_metrics(pred, axis)["four_in_order"][0] == 0.0
    fixed = postprocess.apply("spine", pred)
    assert metrics.level_metrics(fixed, axis)["four_in_order"][0] == 1.0
    np.testing.assert_array_equal(fixed, truth)


def test_the_ensemble_reports_both_and_chooses_on_validation(tmp_path) -> None:
    make_store(tmp_path, models=("m0", "m1", "m2"), noise=[1.5, 2.0, 2.5])
    run_ensemble(tmp_path, {"n_boot": 50, "gallery_n": 0, "top_k": 3, "figures": False})
    results = pd.read_csv(tmp_path / "ensemble" / "results.csv")
    methods = set(results["method"])
    assert {"soft", "soft+spine", "best_single", "best_single+spine"} <= methods
    assert not any(m.startswith("model:") and "+" in m for m in methods)
    selection = json.loads((tmp_path / "ensemble" / "selection.json").read_text())
    for rule, scores in selection["postprocess_scores"].items():
        assert set(scores) == {"none", "spine"}
        best = max(scores.values())
        chosen = selection["postprocess"][rule]
        assert scores[chosen] == best
        if scores["none"] == best:
            assert chosen == "none"  # a tie keeps the labels as they are

    run_ensemble(tmp_path, {"n_boot": 50, "gallery_n": 0, "figures": False, "postprocess": []})
    results = pd.read_csv(tmp_path / "ensemble" / "results.csv")
    assert not results["method"].str.contains("+", regex=False).any()
    with pytest.raises(ConfigError, match="unknown post-processing 'blur'"):
        run_ensemble(tmp_path, {"postprocess": ["blur"]})
