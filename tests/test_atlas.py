"""The film-blind atlas: where the region lies on the training films, placed unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from spineseg.ensemble.baseline import ATLAS_GRID, fit_atlas, on_grid
from spineseg.ensemble.metrics import level_metrics, spine_axis
from spineseg.labels import level_value, vertebra_labels


def _film(h: int, w: int, top: int, pitch: int) -> np.ndarray:
    """Th8..Th11 as 1..4, each body `pitch` - 2 rows tall, from row `top` down."""
    out = np.zeros((h, w), np.uint8)
    for k in range(4):
        y = top + k * pitch
        out[y : y + pitch - 2, w // 3 : 2 * w // 3] = k + 1
    return out


def test_the_atlas_of_identical_films_is_their_mask_on_any_film_size():
    film = _film(128, 64, 40, 10)
    atlas = fit_atlas([on_grid(film > 0)] * 3, 2)
    assert atlas.n == 3 and atlas.probs.shape == (1, *ATLAS_GRID)
    for shape in ((128, 64), (256, 128)):
        placed = atlas.labels(shape)
        truth = on_grid(film > 0, shape)
        assert placed.shape == shape and (placed == truth).mean() > 0.99


def test_the_atlas_misses_the_level_on_a_film_framed_otherwise():
    """Film-blind by design: on a film whose region sits one pitch lower it is one pitch off,
    which is the level error a model that learned the framing also makes."""
    same, lower = _film(128, 64, 40, 10), _film(128, 64, 50, 10)
    atlas = fit_atlas([on_grid(same)] * 4, 5)
    pred = np.stack([atlas.labels(same.shape)] * 2)
    axis = spine_axis(np.stack([same, lower]))
    got = level_metrics((pred > 0).astype(np.uint8), axis)
    assert got["level_error"].tolist() == [0, 1]
    assert got["level_offset"][1] == pytest.approx(-1.0, abs=0.05)  # too high by one pitch


def test_the_cut_is_chosen_on_the_training_films():
    """Five films put the region at one height and one film lower: the cut chosen on them
    keeps what the five share, not the union of every film's region."""
    a, b = _film(128, 64, 40, 10), _film(128, 64, 50, 10)
    atlas = fit_atlas([on_grid(a > 0)] * 5 + [on_grid(b > 0)], 2)
    assert 1 / 6 < atlas.threshold <= 5 / 6
    assert (atlas.labels(a.shape) == (a > 0)).mean() > 0.99
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        fit_atlas(np.zeros((0, 4, 4), np.uint8), 2)


def _column(h: int, w: int, top: int, heights: list[int]) -> np.ndarray:
    """Th1..L5 as level values, bodies of the given heights, a 2-row disc below each."""
    out = np.zeros((h, w), np.uint8)
    y = top
    for k, height in enumerate(heights):
        out[y : y + height, w // 3 : 2 * w // 3] = level_value("Th1") + k
        y += height + 2
    return out


def test_the_column_proportion_yardstick_places_the_region_by_its_fraction_of_the_column():
    """benchmarks/level_baseline.py: the truth region's centroid as a fraction of its own
    Th1..L5 column, by hand on a film of 17 equal bodies; a film whose lumbar bodies are
    taller has its region higher in the column."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from level_baseline import column_ends, column_fractions

    even = _column(256, 64, 10, [8] * 17)
    tall_lumbar = _column(256, 64, 10, [8] * 12 + [14] * 5)
    labels = np.stack([even, tall_lumbar])
    assert column_ends(labels) == (level_value("Th1"), level_value("L5"))
    axis = spine_axis(vertebra_labels(labels))
    got, length = column_fractions(labels, axis, column_ends(labels))
    assert length[0] == 177 - 10  # first row of Th1 to last row of L5
    centre = np.mean([10 + 10 * k + 3.5 for k in range(7, 11)])  # rows of Th8..Th11
    assert got[0] == pytest.approx((centre - 10) / (10 + 16 * 10 + 7 - 10))
    assert got[1] == pytest.approx((centre - 10) / (10 + 12 * 10 + 5 * 16 - 2 - 1 - 10))
    assert got[1] < got[0]
    no_l5 = np.where(even == level_value("L5"), 0, even)[None]
    assert np.isnan(
        column_fractions(no_l5, spine_axis(vertebra_labels(no_l5)), column_ends(labels))
    ).all()
