"""Voting rules: hand-computed examples (ties, empties, K=1, even K, multiclass), hypothesis
properties (ranges, orderings, chunk invariance) and STAPLE on synthetic raters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spineseg.ensemble import rules, voting
from spineseg.errors import ConfigError

RULE_NAMES = ("soft", "hard", "weighted", "max", "median", "staple", "logit_mean")


def binary(*models: list[float]) -> torch.Tensor:
    """K models' P(foreground) for one image of 1 x W pixels -> (K, 1, 1, 1, W)."""
    return torch.tensor(models, dtype=torch.float32)[:, None, None, None, :]


def multiclass(*models: list[list[float]]) -> torch.Tensor:
    """K models' class probabilities for one image of 1 x W pixels, given as [pixel][class]
    -> (K, 1, C, 1, W)."""
    t = torch.tensor(models, dtype=torch.float32)  # (K, W, C)
    return t.permute(0, 2, 1)[:, None, :, None, :]


def fused(name: str, probs: torch.Tensor, **kw) -> list[float]:
    """Flat list of the single channel of a fused one-image binary score map."""
    return rules.fuse(name, probs, **kw)[0, 0, 0].tolist()


# K = 3 models over 3 pixels.
P3 = binary([0.2, 0.6, 0.9], [0.4, 0.4, 0.8], [0.9, 0.7, 0.1])


def test_rules_registry_has_exactly_the_paper_rules_and_extras():
    assert tuple(rules.RULES) == RULE_NAMES


def test_soft_is_the_mean():
    assert fused("soft", P3) == pytest.approx([0.5, 1.7 / 3, 0.6], abs=1e-6)


def test_hard_is_the_fraction_of_models_above_threshold():
    assert fused("hard", P3) == pytest.approx([1 / 3, 2 / 3, 2 / 3], abs=1e-6)
    # A different threshold changes each model's vote: p > 0.3 -> [2, 3, 2] of 3.
    assert fused("hard", P3, threshold=0.3) == pytest.approx([2 / 3, 1, 2 / 3], abs=1e-6)


def test_weighted_normalises_the_weights():
    # weights [2, 1, 1] -> [0.5, 0.25, 0.25]
    assert fused("weighted", P3, weights=[2, 1, 1]) == pytest.approx(
        [0.425, 0.575, 0.675], abs=1e-6
    )
    # Scaling all weights changes nothing.
    assert fused("weighted", P3, weights=torch.tensor([20.0, 10, 10])) == pytest.approx(
        [0.425, 0.575, 0.675], abs=1e-6
    )


def test_max_and_median():
    assert fused("max", P3) == pytest.approx([0.9, 0.7, 0.9], abs=1e-6)
    assert fused("median", P3) == pytest.approx([0.4, 0.6, 0.8], abs=1e-6)


def test_median_of_even_k_is_the_mean_of_the_middle_two_not_the_lower():
    probs = binary([0.1], [0.9], [0.6], [0.2])
    # sorted 0.1, 0.2, 0.6, 0.9 -> (0.2 + 0.6) / 2; torch.median would give 0.2.
    assert fused("median", probs) == pytest.approx([0.4], abs=1e-6)
    assert float(torch.median(probs, dim=0).values) == pytest.approx(0.2)


def test_logit_mean_hand_computed():
    # logits -ln3, ln3, ln9 -> mean ln(9)/3 -> sigmoid = c / (1 + c), c = 9 ** (1/3)
    c = 9 ** (1 / 3)
    probs = binary([0.25, 0.2, 0.5], [0.75, 0.8, 0.5], [0.9, 0.5, 0.5])
    got = fused("logit_mean", probs)
    assert got[0] == pytest.approx(c / (1 + c), abs=1e-6)
    # ln(0.2/0.8) + ln(0.8/0.2) + 0 = 0 -> exactly 0.5
    assert got[1] == pytest.approx(0.5, abs=1e-6)
    assert got[2] == pytest.approx(0.5, abs=1e-6)


def test_logit_mean_clips_certain_probabilities():
    # Without clipping log(0) would give nan; with clipping 0 and 1 cancel exactly.
    assert fused("logit_mean", binary([0.0], [1.0])) == pytest.approx([0.5], abs=1e-6)
    # One certain model does not force the fused score to 0 ...
    assert 0.0 < fused("logit_mean", binary([0.0], [0.9]))[0] < 0.01
    # ... and the geometric mean stays within the models' range: all at 0 gives 0.
    assert fused("logit_mean", binary([0.0], [0.0]))[0] == 0.0


def test_hard_vote_tie_with_even_k_goes_to_background():
    probs = binary([0.9, 0.9, 0.9], [0.8, 0.8, 0.2], [0.1, 0.3, 0.1], [0.2, 0.1, 0.1])
    scores = rules.fuse("hard", probs)
    assert scores[0, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0.25])
    assert voting.to_labels(scores)[0, 0].tolist() == [0, 0, 0]
    # One more vote makes a strict majority.
    probs5 = torch.cat([probs, binary([0.7, 0.1, 0.1])])
    assert voting.to_labels(rules.fuse("hard", probs5))[0, 0].tolist() == [1, 0, 0]


def test_threshold_is_strict_in_hard_vote_and_to_labels():
    # p == threshold is not a foreground vote; score == threshold is background.
    assert fused("hard", binary([0.5])) == [0.0]
    assert voting.to_labels(torch.full((1, 1, 1, 1), 0.5))[0, 0].tolist() == [0]
    assert voting.to_labels(torch.full((1, 1, 1, 1), 0.5), threshold=0.4)[0, 0].tolist() == [1]


@pytest.mark.parametrize("name", RULE_NAMES)
def test_k_equals_one_reproduces_the_single_model_decision(name):
    probs = binary([0.1, 0.45, 0.55, 0.97, 0.0, 1.0])
    labels = voting.to_labels(rules.fuse(name, probs, weights=[3.0]))
    assert labels[0, 0].tolist() == [0, 0, 1, 1, 0, 1]


@pytest.mark.parametrize("name", ["soft", "weighted", "max", "median"])
def test_k_equals_one_passes_probabilities_through(name):
    probs = binary([0.1, 0.45, 0.55, 0.97])
    assert fused(name, probs, weights=[1.0]) == pytest.approx([0.1, 0.45, 0.55, 0.97])


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("channels", [1, 5])
def test_all_empty_masks_stay_empty_and_all_full_stay_full(name, channels):
    k, n, h, w = 4, 2, 6, 5
    if channels == 1:
        empty = torch.zeros(k, n, 1, h, w)
        full = torch.ones(k, n, 1, h, w)
    else:
        empty = torch.zeros(k, n, channels, h, w)
        empty[:, :, 0] = 1.0  # every model: background everywhere
        full = torch.zeros(k, n, channels, h, w)
        full[:, :, 3] = 1.0  # every model: class 3 everywhere
    weights = [1.0, 2.0, 3.0, 4.0]
    assert int(voting.to_labels(rules.fuse(name, empty, weights)).max()) == 0
    full_labels = voting.to_labels(rules.fuse(name, full, weights))
    assert bool((full_labels == (1 if channels == 1 else 3)).all())


# Multiclass: 3 models, 3 classes, pixels given as class-probability rows.
M3 = multiclass(
    [[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]],
    [[0.1, 0.3, 0.6], [0.5, 0.1, 0.4]],
    [[0.3, 0.6, 0.1], [0.2, 0.2, 0.6]],
)


def test_multiclass_hand_computed_soft_hard_max_median():
    soft = rules.fuse("soft", M3)[0, :, 0]  # (C, W)
    assert soft[:, 0].tolist() == pytest.approx([0.2, 1.6 / 3, 0.8 / 3], abs=1e-6)
    # argmaxes: pixel 0 -> 1, 2, 1 ; pixel 1 -> 0, 0, 2
    hard = rules.fuse("hard", M3)[0, :, 0]
    assert hard[:, 0].tolist() == pytest.approx([0, 2 / 3, 1 / 3], abs=1e-6)
    assert hard[:, 1].tolist() == pytest.approx([2 / 3, 0, 1 / 3], abs=1e-6)
    assert rules.fuse("max", M3)[0, :, 0, 0].tolist() == pytest.approx([0.3, 0.7, 0.6])
    assert rules.fuse("median", M3)[0, :, 0, 1].tolist() == pytest.approx([0.5, 0.2, 0.4])
    assert voting.to_labels(rules.fuse("hard", M3))[0, 0].tolist() == [1, 0]
    assert voting.to_labels(rules.fuse("soft", M3))[0, 0].tolist() == [1, 0]


def test_multiclass_logit_mean_hand_computed():
    # mean log-probs: ln .4, ln .2, ln .2 -> softmax [0.5, 0.25, 0.25]
    probs = multiclass([[0.8, 0.1, 0.1]], [[0.2, 0.4, 0.4]])
    got = rules.fuse("logit_mean", probs)[0, :, 0, 0].tolist()
    assert got == pytest.approx([0.5, 0.25, 0.25], abs=1e-6)


def test_multiclass_ties_go_to_the_lowest_class():
    # Between models: one votes class 2, one class 1 -> [0, .5, .5] -> class 1.
    probs = multiclass([[0.1, 0.2, 0.7]], [[0.1, 0.7, 0.2]])
    scores = rules.fuse("hard", probs)
    assert scores[0, :, 0, 0].tolist() == pytest.approx([0, 0.5, 0.5])
    assert voting.to_labels(scores)[0, 0].tolist() == [1]
    # Inside one model: probabilities tied between 0 and 1 -> that model votes class 0.
    tied = multiclass([[0.4, 0.4, 0.2]])
    assert rules.fuse("hard", tied)[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_to_labels_shapes_and_dtype():
    scores = torch.rand(3, 4, 5, 6)
    labels = voting.to_labels(scores, threshold=0.9)  # threshold ignored for multiclass
    assert labels.shape == (3, 5, 6)
    assert labels.dtype == torch.uint8
    assert torch.equal(labels, scores.argmax(1).to(torch.uint8))
    binary_labels = voting.to_labels(scores[:, :1], threshold=0.3)
    assert torch.equal(binary_labels, (scores[:, 0] > 0.3).to(torch.uint8))


def test_fuse_errors():
    with pytest.raises(ConfigError, match=r"valid choices: .*soft"):
        rules.fuse("mean", P3)
    with pytest.raises(ConfigError, match="weights"):
        rules.fuse("weighted", P3)
    for bad in ([1.0, 2.0], [1.0, -1.0, 1.0], [1.0, math.nan, 1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ConfigError):
            rules.fuse("weighted", P3, weights=bad)
    with pytest.raises(ValueError):
        rules.fuse("soft", P3[0])


def test_disagreement_hand_computed():
    probs = binary([0.9, 0.9, 0.9, 0.1], [0.8, 0.8, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.6] * 4)
    # fg votes per pixel: 4, 3, 2, 1 of 4 -> unanimous 0, 3-1 split 0.5, even split 1
    assert voting.disagreement(probs)[0, 0].tolist() == pytest.approx([0, 0.5, 1, 0.5])
    assert voting.disagreement(probs[:1])[0, 0].tolist() == [0, 0, 0, 0]
    # Multiclass: three models vote 1, 2, 0 -> modal 1/3 -> (2/3) / (1 - 1/3) = 1.
    mc = multiclass([[0.1, 0.8, 0.1]], [[0.1, 0.1, 0.8]], [[0.8, 0.1, 0.1]])
    assert voting.disagreement(mc)[0, 0].tolist() == pytest.approx([1.0])
    assert voting.disagreement(M3).shape == (1, 1, 2)


# --- hypothesis properties -------------------------------------------------------------------


@st.composite
def prob_stacks(draw, k=None, n=None, channels=None):
    """(K, N, C, H, W) float32 probabilities; multiclass channels sum to 1."""
    k = k or draw(st.integers(1, 5))
    n = n or draw(st.integers(1, 4))
    c = channels or draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(hnp.arrays(np.float32, (k, n, c, h, w), elements=st.floats(0, 1, width=32)))
    if c > 1:
        x = (x + 1e-3) / (x + 1e-3).sum(axis=2, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(prob_stacks(), st.floats(0.1, 10))
def test_soft_equals_weighted_with_equal_weights(probs, w):
    weights = [w] * probs.shape[0]
    torch.testing.assert_close(
        rules.fuse("soft", probs), rules.fuse("weighted", probs, weights), atol=1e-6, rtol=0
    )


@SETTINGS
@given(prob_stacks(k=3))
def test_median_of_three_is_the_middle_value(probs):
    middle = probs.sort(dim=0).values[1]
    assert torch.equal(rules.fuse("median", probs), middle)


@SETTINGS
@given(prob_stacks())
def test_max_ge_mean_ge_min(probs):
    mean = rules.fuse("soft", probs)
    assert bool((rules.fuse("max", probs) >= mean - 1e-6).all())
    assert bool((mean >= probs.amin(0) - 1e-6).all())
    med = rules.fuse("median", probs)
    assert bool((med <= rules.fuse("max", probs)).all())
    assert bool((med >= probs.amin(0)).all())


@SETTINGS
@given(prob_stacks(), st.data())
def test_every_rule_outputs_float32_scores_in_unit_interval(probs, data):
    weights = data.draw(
        st.lists(st.floats(0, 5), min_size=probs.shape[0], max_size=probs.shape[0]).filter(
            lambda ws: sum(ws) > 0
        )
    )
    _, n, c, h, w = probs.shape
    for name in RULE_NAMES:
        scores = rules.fuse(name, probs, weights)
        assert scores.shape == (n, c, h, w)
        assert scores.dtype == torch.float32
        assert bool(((scores >= 0) & (scores <= 1)).all()), name
    d = voting.disagreement(probs)
    assert d.shape == (n, h, w)
    assert bool(((d >= 0) & (d <= 1)).all())


@SETTINGS
@given(prob_stacks(n=4), st.floats(0.2, 0.8))
def test_chunking_invariance(probs, threshold):
    weights = torch.arange(1, probs.shape[0] + 1, dtype=torch.float32)
    for name in RULE_NAMES:
        whole = rules.fuse(name, probs, weights, threshold)
        parts = torch.cat(
            [rules.fuse(name, probs[:, s], weights, threshold) for s in (slice(0, 2), slice(2, 4))]
        )
        torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0, msg=name)
    parts = torch.cat([voting.disagreement(probs[:, s]) for s in (slice(0, 2), slice(2, 4))])
    assert torch.equal(parts, voting.disagreement(probs))


@SETTINGS
@given(prob_stacks(channels=1))
def test_hard_labels_are_a_strict_majority(probs):
    votes = (probs[:, :, 0] > 0.5).sum(0)
    expected = (2 * votes > probs.shape[0]).to(torch.uint8)
    assert torch.equal(voting.to_labels(rules.fuse("hard", probs)), expected)


# --- STAPLE --------------------------------------------------------------------------------------

SENS = torch.tensor([0.97, 0.9, 0.8, 0.7, 0.6])
SPEC = torch.tensor([0.98, 0.92, 0.85, 0.75, 0.65])


def synthetic_raters(seed: int = 0, n: int = 2, size: int = 48):
    """Truth = a disc per image; rater j flips foreground with 1 - SENS[j] and background with
    1 - SPEC[j], independently per pixel. Returns (probs (K,N,1,H,W), truth (N,H,W))."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    truth = torch.stack(
        [((yy - 20 - 4 * i) ** 2 + (xx - 24) ** 2 < (12 + 3 * i) ** 2) for i in range(n)]
    )
    u = torch.rand(len(SENS), n, size, size, generator=g)
    sens, spec = SENS[:, None, None, None], SPEC[:, None, None, None]
    rated = torch.where(truth, u < sens, u > spec)
    return rated.to(torch.float32)[:, :, None], truth


def test_staple_beats_or_matches_majority_and_ranks_raters():
    probs, truth = synthetic_raters()
    staple_acc = (voting.to_labels(rules.fuse("staple", probs)).bool() == truth).float().mean()
    major_acc = (voting.to_labels(rules.fuse("hard", probs)).bool() == truth).float().mean()
    assert staple_acc >= major_acc
    k, n = probs.shape[:2]
    decisions = (probs[:, :, 0] > 0.5).permute(1, 0, 2, 3).reshape(n, k, -1)
    est = voting.staple_em(decisions)
    for i in range(n):
        # Estimates are ordered like the true rates (best rater first) and near them (the
        # mean-vote prior overstates foreground here, which pulls sensitivities down a bit).
        assert est.sensitivity[i].argsort(descending=True).tolist() == list(range(k))
        assert est.specificity[i].argsort(descending=True).tolist() == list(range(k))
        torch.testing.assert_close(est.sensitivity[i], SENS, atol=0.1, rtol=0)
        torch.testing.assert_close(est.specificity[i], SPEC, atol=0.1, rtol=0)
    assert bool((est.iterations >= 1).all())


def test_staple_trusts_a_good_rater_over_a_bad_majority():
    # Rater 0 is perfect; raters 1, 2 are noisy (independent errors). STAPLE should follow
    # rater 0 much more often than the majority does.
    _, truth = synthetic_raters(seed=1, n=1)
    good = truth.to(torch.float32)[None, :, None]
    g = torch.Generator().manual_seed(3)
    noisy = [
        torch.where(
            truth,
            torch.rand(truth.shape, generator=g) < 0.6,
            torch.rand(truth.shape, generator=g) > 0.7,
        ).to(torch.float32)[None, :, None]
        for _ in range(2)
    ]
    stack = torch.cat([good, *noisy])
    staple_err = (voting.to_labels(rules.fuse("staple", stack)).bool() != truth).sum()
    major_err = (voting.to_labels(rules.fuse("hard", stack)).bool() != truth).sum()
    assert staple_err < major_err


def test_staple_multiclass_unanimous_and_one_vs_rest():
    # Unanimous models -> the common argmax; a dissenting minority is outvoted.
    probs = multiclass(
        [[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
        [[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
        [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8]],
    )
    assert voting.to_labels(rules.fuse("staple", probs))[0, 0].tolist() == [1, 0, 2]


def test_staple_vote_pattern_counts_match_the_pixelwise_em():
    """staple_em runs EM on vote-pattern counts when that is smaller; same answer as per pixel."""
    probs, _ = synthetic_raters(seed=2, n=2, size=24)
    k, n = probs.shape[:2]
    decisions = (probs[:, :, 0] > 0.5).permute(1, 0, 2, 3).reshape(n, k, -1)
    assert 2**k < decisions.shape[2]  # pattern mode is the one taken
    fast = voting.staple_em(decisions)
    slow = voting._staple_core(
        decisions.float().contiguous(), None, eps=1e-6, tol=1e-5, max_iter=100
    )
    torch.testing.assert_close(fast.posterior, slow.posterior, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.sensitivity, slow.sensitivity, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.specificity, slow.specificity, atol=1e-4, rtol=0)


def test_hard_vote_decides_by_majority_whatever_the_threshold():
    """A tuned threshold binarises each model; the fused decision stays a strict majority."""
    import torch

    from spineseg.ensemble.rules import fuse_labels

    probs = torch.tensor([0.35, 0.35, 0.1, 0.1]).view(4, 1, 1, 1, 1)  # 2 of 4 models above 0.3
    assert fuse_labels("hard", probs, threshold=0.3).item() == 0  # a tie is background
    probs = torch.tensor([0.35, 0.35, 0.35, 0.1]).view(4, 1, 1, 1, 1)  # 3 of 4 above 0.3
    assert fuse_labels("hard", probs, threshold=0.3).item() == 1
    assert fuse_labels("soft", probs, threshold=0.3).item() == 0  # mean 0.2875 < 0.3
