"""Every registered rule scores the same labels on both paths of the one chunk scorer.

`agreement.score_keys` evaluates each rule's band kernel only where the models disagree;
these tests hold it to `rules.fuse_labels` / `voting.to_labels` on every pixel, label for
label, for every entry of `rules.RULES`, including values sitting exactly on the threshold,
even K (median and hard-vote ties), tuned per-rule thresholds and STAPLE's agreement
patterns; and they check that a rule added without a kernel is scored densely."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spineseg.ensemble import agreement, rules, scoring, voting
from spineseg.ensemble.evaluate import EnsembleSpec, evaluate_arrays
from spineseg.ensemble.scoring import Method

RULES = list(rules.RULES)
#: float16 values around the default threshold and the tuned ones below, plus 0 and 1.
EDGE = np.array(
    [0.0, 1.0, 0.5, 0.4998, 0.5005, 0.3, 0.2998, 0.3003, 0.6, 0.25, 0.75, 1e-4], dtype=np.float16
)


def methods_for(k: int, thresholds: dict[str, float], t_model: float = 0.5):
    return [Method(r, thresholds.get(r, 0.5), rule=r) for r in RULES] + [
        Method(f"model:{j}", t_model, model=j) for j in range(k)
    ]


def dense_labels(probs16: np.ndarray, m: Method, weights: torch.Tensor) -> np.ndarray:
    """(n, P) labels from fusing every pixel, the evaluator's reference path."""
    k, n, p = probs16.shape
    chunk = torch.from_numpy(probs16.astype(np.float32)).reshape(k, n, 1, 1, p)
    if m.model is not None:
        return voting.to_labels(chunk[m.model], m.threshold).reshape(n, p).numpy().astype(bool)
    return (
        rules.fuse_labels(m.rule, chunk, weights, threshold=m.threshold)
        .reshape(n, p)
        .numpy()
        .astype(bool)
    )


def check_chunk(probs16: np.ndarray, truth: np.ndarray, thresholds: dict[str, float], w) -> None:
    k = probs16.shape[0]
    weights = torch.as_tensor(w, dtype=torch.float32)
    methods = methods_for(k, thresholds, thresholds.get("model", 0.5))
    keys = torch.from_numpy(probs16.copy()).view(torch.int16)
    assert agreement.supports(methods, k, probs16.shape[2])
    scored = agreement.score_keys(
        keys, torch.from_numpy(truth), methods, weights, np.float16, want_labels=True
    )
    assert scored is not None
    for m in methods:
        want = dense_labels(probs16, m, weights)
        got = scored[m.name]
        np.testing.assert_array_equal(got.labels.numpy(), want, err_msg=m.name)
        np.testing.assert_array_equal(got.tp.numpy(), (want & truth).sum(1), err_msg=m.name)
        np.testing.assert_array_equal(got.ps.numpy(), want.sum(1), err_msg=m.name)


def realistic(k: int, n: int, p: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Confident models that disagree on a minority of pixels, with some edge values."""
    truth = rng.random((n, p)) < 0.3
    logits = np.where(truth, 4.0, -4.0)[None] + rng.normal(0, 2.5, (k, n, p))
    probs = 1 / (1 + np.exp(-logits))
    edge = rng.random(probs.shape) < 0.1
    probs[edge] = rng.choice(EDGE.astype(np.float64), size=int(edge.sum()))
    return probs.astype(np.float16), truth


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 10])
def test_every_rule_and_model_matches_the_dense_path(k):
    rng = np.random.default_rng(k)
    probs, truth = realistic(k, 4, 1500, rng)  # 1500 > 2^10 pixels: STAPLE by patterns
    check_chunk(probs, truth, {}, rng.random(k) + 0.1)


@pytest.mark.parametrize("k", [3, 4])
def test_tuned_thresholds_per_rule(k):
    rng = np.random.default_rng(10 + k)
    probs, truth = realistic(k, 3, 400, rng)
    tuned = {"soft": 0.3, "hard": 0.6, "median": 0.3, "max": 0.6, "staple": 0.3, "model": 0.3}
    check_chunk(probs, truth, tuned, np.ones(k))


def test_all_agree_and_empty_truth():
    probs = np.zeros((4, 2, 100), dtype=np.float16)
    probs[:, 1, :30] = 0.9  # image 1: every model says foreground on 30 pixels
    truth = np.zeros((2, 100), dtype=bool)
    check_chunk(probs, truth, {}, np.ones(4))


@pytest.mark.parametrize("w", [np.full(10, 0.1), np.arange(1, 11) / 7.0, np.full(10, 1 / 3)])
def test_every_model_exactly_on_the_threshold(w):
    """All models at exactly t = 0.5: every rule says background on both paths, even when
    the float32 weights do not sum to exactly 1."""
    probs = np.full((10, 2, 1100), 0.5, dtype=np.float16)  # 1100 > 2^10: STAPLE by patterns
    probs[:, 1, :400] = 0.25
    check_chunk(probs, np.ones((2, 1100), dtype=bool), {}, w)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 5),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    t=st.sampled_from([0.5, 0.3, 0.6]),
)
def test_random_edge_values(k, n, seed, t):
    rng = np.random.default_rng(seed)
    probs = rng.choice(EDGE, size=(k, n, 40))  # 40 > 2^5 pixels
    truth = rng.random((n, 40)) < 0.5
    check_chunk(probs, truth, dict.fromkeys([*RULES, "model"], t), rng.random(k) + 0.01)


def test_out_of_range_values_go_to_the_dense_path():
    probs = np.full((2, 1, 50), 0.7, dtype=np.float16)
    truth = np.ones((1, 50), dtype=bool)
    for bad in (np.nan, 1.5, -0.25):
        probs[1, 0, 3] = bad
        keys = torch.from_numpy(probs.copy()).view(torch.int16)
        assert (
            agreement.score_keys(
                keys, torch.from_numpy(truth), methods_for(2, {}), None, np.float16
            )
            is None
        )


def test_threshold_key_rounds_like_a_float32_comparison():
    for t in (0.5, 0.3, 0.35, 0.123456, 0.999):
        key = agreement.threshold_key(t, np.float16)
        values = np.arange(0, 0x3C01, dtype=np.int16).view(np.float16)
        above = values.astype(np.float32) > np.float32(t)
        np.testing.assert_array_equal(np.arange(0, 0x3C01) > key, above)
    assert agreement.threshold_key(0.3, np.float32) == np.float32(0.3).view(np.int32)


@pytest.mark.parametrize("k", [3, 4])
def test_evaluator_fast_and_dense_paths_give_one_table(k, monkeypatch):
    """End to end with distances: float16 arrays take the agreement path, the same values as
    float64 arrays take the dense path."""
    calls = []
    score = agreement.score_keys
    monkeypatch.setattr(
        agreement, "score_keys", lambda *a, **kw: calls.append(score(*a, **kw)) or calls[-1]
    )
    rng = np.random.default_rng(k)
    n, h, w = 5, 36, 40
    masks = np.zeros((n, h, w), dtype=np.uint8)
    masks[:, 8:28, 12:30] = 1
    masks[4] = 0  # an empty truth
    arrays = []
    for j in range(k):
        logits = np.where(masks, 3.0, -3.0) + rng.normal(0, 1.5 + 0.3 * j, (n, h, w))
        arrays.append((1 / (1 + np.exp(-logits)))[:, None].astype(np.float16))
    arrays[0][1] = 0.0  # an empty prediction
    models = [f"m{j}" for j in range(k)]
    ids = np.array([f"i{j}" for j in range(n)])
    spec = EnsembleSpec(
        models, list(rng.random(k) + 0.1), RULES, {**dict.fromkeys(RULES, 0.5), "soft": 0.4}, "m1"
    )
    spacing = np.full((n, 2), 0.5)
    fast = evaluate_arrays("test", arrays, masks, ids, spec, spacing, chunk_size=2)
    assert len(calls) == 3 and all(c is not None for c in calls)
    dense = evaluate_arrays(
        "test", [a.astype(np.float64) for a in arrays], masks, ids, spec, spacing, chunk_size=3
    )
    assert len(calls) == 3  # the float64 run never reached the agreement path
    pd.testing.assert_frame_equal(fast, dense)


def test_selection_scores_and_tuned_thresholds_match_the_dense_path(tmp_path, monkeypatch):
    """Validation Dice per model and the threshold-tuning table (7 rules x 19 thresholds)
    are the same whether chunks take the agreement path or fuse every pixel."""
    from ensemble_fixtures import make_store

    from spineseg.ensemble.selection import ValidationView, tune_thresholds, validation_scores

    models = ["m0", "m1", "m2", "m3"]
    view = ValidationView(make_store(tmp_path, models=models, shape=(40, 36)))
    weights = [0.4, 0.3, 0.2, 0.1]
    fast = validation_scores(view, models), tune_thresholds(view, models, weights, RULES)
    monkeypatch.setattr(scoring, "_agreement", lambda *a, **kw: None)
    dense = validation_scores(view, models), tune_thresholds(view, models, weights, RULES)
    assert fast == dense


def test_a_rule_without_a_kernel_is_scored_densely(monkeypatch):
    """Adding a rule is one registry entry: without a band kernel the scorer fuses every
    pixel, and the rule runs beside the others with nothing else to change."""
    trimmed = rules.Rule("trimmed", lambda p, **kw: voting.median_vote(p))
    monkeypatch.setitem(rules.RULES, "trimmed", trimmed)
    rng = np.random.default_rng(3)
    probs, truth = realistic(5, 3, 300, rng)
    raw = probs.reshape(5, 3, 1, 15, 20)
    methods = [Method("trimmed", 0.5, rule="trimmed"), Method("median", 0.5, rule="median")]
    assert not agreement.supports(methods, 5, 300)
    got = scoring.score_chunk(
        raw, truth.reshape(3, 15, 20), methods, None, models=list("abcde"), split="val",
        ids=["x", "y", "z"],
    )  # fmt: skip
    np.testing.assert_array_equal(got["trimmed"].labels, got["median"].labels)
    np.testing.assert_array_equal(got["trimmed"].overlap["dice"], got["median"].overlap["dice"])


@pytest.mark.parametrize("name", RULES)
def test_every_registered_rule_on_both_paths_of_the_scorer(name, monkeypatch):
    """`scoring.score_chunk` with and without its agreement path: identical labels and Dice."""
    rng = np.random.default_rng(len(name))
    probs, truth = realistic(4, 3, 600, rng)
    raw, masks = probs.reshape(4, 3, 1, 20, 30), truth.reshape(3, 20, 30).astype(np.uint8)
    methods = [Method(name, 0.4, rule=name)]
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    opts = {"models": list("abcd"), "split": "val", "ids": ["x", "y", "z"], "want_labels": True}
    fast = scoring.score_chunk(raw.copy(), masks, methods, weights, **opts)[name]
    monkeypatch.setattr(scoring, "_agreement", lambda *a, **kw: None)
    dense = scoring.score_chunk(raw.copy(), masks, methods, weights, **opts)[name]
    np.testing.assert_array_equal(fast.labels.astype(np.uint8), dense.labels)
    for key in ("dice", "iou", "precision", "recall"):
        np.testing.assert_allclose(fast.overlap[key], dense.overlap[key], rtol=0, atol=1e-12)
