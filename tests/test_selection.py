"""Selection on validation only: ranking, top-k, Caruana greedy, thresholds, no test leak."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from ensemble_fixtures import make_store

from spineseg.ensemble.selection import (
    ValidationView,
    greedy_select,
    save_selection,
    select_models,
    validation_scores,
)
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import ConfigError


class RecordingStore(PredictionStore):
    """Records every (model, split) whose file is opened."""

    def __init__(self, run_dir) -> None:
        super().__init__(run_dir)
        self.touched: set[tuple[str, str]] = set()

    def probs_path(self, model, split, tta="none"):
        self.touched.add((model, split))
        return super().probs_path(model, split, tta)

    def truth_path(self, split):
        self.touched.add(("_truth", split))
        return super().truth_path(split)


def test_selection_reads_val_only(tmp_path):
    make_store(tmp_path, models=("m0", "m1", "m2"))
    # Ruin every test/external file: selection must not notice.
    for path in (tmp_path / "predictions").rglob("*.npz"):
        if path.stem in ("test", "external"):
            path.write_bytes(b"not an npz")
    store = RecordingStore(tmp_path)
    sel = select_models(
        ValidationView(store),
        ["m0", "m1", "m2"],
        k=2,
        method="greedy",
        greedy_size=4,
        tune_threshold=True,
        rules=["soft", "hard"],
    )
    assert sel.models
    assert store.touched, "the recorder saw nothing"
    assert {split for _, split in store.touched} == {"val"}


def test_view_cannot_be_pointed_elsewhere(tmp_path):
    store = make_store(tmp_path, models=("m0",))
    with pytest.raises(ConfigError, match="validation split only"):
        ValidationView(store, "test")
    view = ValidationView(store)
    assert view.split == "val"
    assert not hasattr(view, "__dict__")  # no attribute holding the store
    assert all(not isinstance(getattr(view, s), PredictionStore) for s in view.__slots__)


def test_top_k_ranks_by_validation_dice(tmp_path):
    store = make_store(tmp_path, models=("bad", "good", "mid"), noise=[6.0, 0.5, 3.0])
    view = ValidationView(store)
    scores = validation_scores(view, ["bad", "good", "mid"])
    assert scores["good"] > scores["mid"] > scores["bad"]
    sel = select_models(view, None, k=2)
    assert sel.models == ["good", "mid"] and sel.best_single == "good"
    assert (
        sel.model_threshold == 0.5
        and select_models(view, None, threshold=0.3).model_threshold == 0.3
    )
    assert sel.n_val == 4 and sel.k == 2 and sel.method == "top_k"
    assert np.isclose(sum(sel.weights), 1.0)
    expected = np.array([scores["good"], scores["mid"]])
    np.testing.assert_allclose(sel.weights, expected / expected.sum())
    assert sel.thresholds == dict.fromkeys(sel.thresholds, 0.5)


def test_k_larger_than_models_warns_and_uses_all(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"))
    with pytest.warns(UserWarning, match="top_k=5 but only 2"):
        sel = select_models(ValidationView(store), k=5)
    assert sorted(sel.models) == ["m0", "m1"]


def test_greedy_improves_or_keeps_val_dice(tmp_path):
    store = make_store(
        tmp_path, models=("m0", "m1", "m2", "m3"), noise=[2.5, 2.6, 2.7, 2.8], sizes={"val": 6}
    )
    view = ValidationView(store)
    scores = validation_scores(view, ["m0", "m1", "m2", "m3"])
    counts, trace = greedy_select(view, scores, size=6)
    assert trace[0] == max(scores.values())
    assert all(b > a for a, b in itertools.pairwise(trace))
    assert sum(counts.values()) == len(trace) <= 6
    sel = select_models(view, method="greedy", greedy_size=6)
    assert sel.multiplicities == counts
    np.testing.assert_allclose(sel.weights, [counts[m] / sum(counts.values()) for m in sel.models])
    assert sel.greedy_trace[-1] >= sel.scores[sel.best_single]


def test_threshold_tuning_picks_a_grid_value_per_rule(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"))
    sel = select_models(ValidationView(store), k=2, rules=["soft", "max"], tune_threshold=True)
    assert set(sel.thresholds) == {"soft", "max"}
    for rule, t in sel.thresholds.items():
        table = sel.threshold_scores[rule]
        assert table[f"{t:.2f}"] == max(table.values())


def test_vertebrae_mode_keeps_default_threshold(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"), channels=5)
    sel = select_models(
        ValidationView(store), k=2, rules=["soft"], tune_threshold=True, threshold=0.4
    )
    assert sel.thresholds == {"soft": 0.4}


def test_selection_json(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"))
    sel = select_models(ValidationView(store), k=1)
    path = save_selection(sel, tmp_path / "ensemble" / "selection.json")
    data = json.loads(path.read_text())
    assert data["models"] == ["m0"] and data["weights"] == {"m0": 1.0}
    assert data["split"] == "val" and data["n_val"] == 4 and "soft" in data["thresholds"]
    assert set(data["scores"]) == {"m0", "m1"}


def test_bad_options(tmp_path):
    view = ValidationView(make_store(tmp_path, models=("m0",)))
    with pytest.raises(ConfigError, match="valid choices"):
        select_models(view, method="best")
    with pytest.raises(ConfigError, match="top_k"):
        select_models(view, k=0)
