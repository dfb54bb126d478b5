"""The film-blind atlas: where the region lies on the training films, placed unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from spineseg.ensemble.baseline import ATLAS_GRID, fit_atlas, on_grid
from spineseg.ensemble.metrics import level_metrics, spine_axis


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
