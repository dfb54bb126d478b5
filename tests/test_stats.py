"""Statistics over per-image values: summary, bootstrap CI, paired Wilcoxon, relative gain."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from spineseg.ensemble.stats import (
    bootstrap_ci,
    paired_difference,
    paired_wilcoxon,
    relative_improvement_pct,
    summarize,
)


def test_summarize_hand_computed():
    out = summarize([1.0, 2.0, 3.0, 4.0])
    assert out["mean"] == pytest.approx(2.5)
    assert out["sd"] == pytest.approx(math.sqrt(5 / 3))  # ddof = 1
    assert out["n"] == 4
    assert out["n_nan"] == 0
    assert 1.0 <= out["ci_low"] <= 2.5 <= out["ci_high"] <= 4.0


def test_summarize_ignores_and_counts_nans():
    out = summarize(np.array([1.0, np.nan, 3.0, np.nan]))
    assert out["mean"] == pytest.approx(2.0)
    assert out["n"] == 2
    assert out["n_nan"] == 2
    assert math.isfinite(out["ci_low"]) and math.isfinite(out["ci_high"])


def test_summarize_one_and_zero_values():
    one = summarize([0.7])
    assert (one["mean"], one["sd"], one["ci_low"], one["ci_high"], one["n"]) == (
        0.7,
        0.0,
        0.7,
        0.7,
        1,
    )
    none = summarize([math.nan])
    assert none["n"] == 0 and none["n_nan"] == 1
    assert all(math.isnan(none[k]) for k in ("mean", "sd", "ci_low", "ci_high"))


def test_ci_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.normal(0.8, 0.1, 20))
    large = bootstrap_ci(rng.normal(0.8, 0.1, 800))
    assert large[1] - large[0] < (small[1] - small[0]) / 3  # width ~ 1/sqrt(n)


def test_ci_deterministic_per_seed_and_consistent_with_summarize():
    values = np.random.default_rng(1).random(50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    out = summarize(values, seed=3)
    assert (out["ci_low"], out["ci_high"]) == bootstrap_ci(values, seed=3)


def test_ci_agrees_with_scipy_percentile_bootstrap():
    values = np.random.default_rng(2).gamma(2.0, 0.1, 60)
    ours = bootstrap_ci(values, n_boot=4000, alpha=0.1)
    ref = sps.bootstrap(
        (values,), np.mean, n_resamples=4000, confidence_level=0.9, method="percentile", rng=0
    ).confidence_interval
    sd_mean = values.std(ddof=1) / math.sqrt(len(values))
    assert ours[0] == pytest.approx(ref.low, abs=0.15 * sd_mean)
    assert ours[1] == pytest.approx(ref.high, abs=0.15 * sd_mean)


def test_ci_blocks_do_not_change_results(monkeypatch):
    """Resampling in memory-capped blocks is an implementation detail, not a result change."""
    import spineseg.ensemble.stats as stats_mod

    values = np.random.default_rng(5).random(40)
    whole = bootstrap_ci(values, n_boot=300)
    monkeypatch.setattr(stats_mod, "_MAX_BLOCK", 40 * 7)  # 7 resamples per block
    assert bootstrap_ci(values, n_boot=300) == pytest.approx(whole, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 2**16))
def test_ci_contains_the_mean(values, seed):
    out = summarize(values, n_boot=300, seed=seed)
    slack = 1e-12 * max(1.0, abs(out["mean"]))  # the resampled means are float sums too
    assert out["ci_low"] - slack <= out["mean"] <= out["ci_high"] + slack


def test_wilcoxon_matches_scipy():
    rng = np.random.default_rng(3)
    a = rng.random(30)
    b = a + rng.normal(0.05, 0.1, 30)
    assert paired_wilcoxon(a, b) == pytest.approx(sps.wilcoxon(a, b).pvalue)
    # NaN pairs are dropped before testing.
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[0], b_nan[5] = np.nan, np.nan
    keep = np.ones(30, bool)
    keep[[0, 5]] = False
    assert paired_wilcoxon(a_nan, b_nan) == pytest.approx(sps.wilcoxon(a[keep], b[keep]).pvalue)


def test_wilcoxon_edge_cases():
    x = np.array([0.9, 0.8, 0.7])
    assert paired_wilcoxon(x, x) == 1.0
    assert math.isnan(paired_wilcoxon([0.5], [0.7]))
    assert math.isnan(paired_wilcoxon([], []))
    with pytest.raises(ValueError):
        paired_wilcoxon([1.0, 2.0], [1.0])


def test_relative_improvement():
    assert relative_improvement_pct(0.9, 0.8) == pytest.approx(12.5)
    assert relative_improvement_pct(0.6, 0.8) == pytest.approx(-25.0)
    assert math.isnan(relative_improvement_pct(0.5, 0.0))


def test_the_paired_difference_resamples_pairs() -> None:
    """A constant gain on films of very different difficulty: the paired CI is the gain
    itself, where comparing the two means' CIs would see only overlap."""
    rng = np.random.default_rng(0)
    b = rng.uniform(0.3, 0.95, 40)
    a = b + 0.01
    got = paired_difference(a, b, n_boot=500)
    assert got["mean"] == pytest.approx(0.01)
    assert got["ci_low"] == pytest.approx(0.01) and got["ci_high"] == pytest.approx(0.01)
    lo_a, _ = bootstrap_ci(a, n_boot=500)
    _, hi_b = bootstrap_ci(b, n_boot=500)
    assert lo_a < hi_b  # the unpaired intervals overlap
    noisy = paired_difference(b + rng.normal(0, 0.05, 40), b, n_boot=500)
    assert noisy["ci_low"] < noisy["mean"] < noisy["ci_high"] and noisy["n"] == 40
    with_nan = paired_difference([0.5, np.nan, 0.7], [0.4, 0.5, np.nan])
    assert with_nan["n"] == 1 and with_nan["mean"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([0.1, 0.2], [0.1])
