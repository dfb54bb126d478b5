"""benchmarks/label_consistency.py: a patient's films compared body by body find a known
renaming of one film's labels, and the offsets it solves for explain every pair."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from spineseg.data.sources import build_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from label_consistency import (
    body_corners,
    body_patches,
    check_patient,
    closure,
    shift_scores,
)


@pytest.fixture(scope="module")
def film():
    return build_source("synthetic", n=1, seed=3, height=512, width=256)[0]


def _rename(patches: dict, by: int) -> dict:
    """The same bodies, each named `by` levels higher up the column (a film whose labels
    sit `by` levels lower than the truth)."""
    return {v - by: p for v, p in patches.items() if v - by >= 1}


def _noisy(patches: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {v: p + rng.normal(0, 0.5, p.shape) for v, p in patches.items()}


def test_corners_of_a_tilted_body_come_top_left_first() -> None:
    mask = np.zeros((200, 200), np.uint8)
    box = cv2.boxPoints(((100, 100), (80, 40), 20)).astype(np.int32)
    cv2.fillPoly(mask, [box], 1)
    tl, tr, bl, br = body_corners(mask.astype(bool))
    assert tl[0] < tr[0] and bl[0] < br[0]  # left before right
    assert tl[1] < bl[1] and tr[1] < br[1]  # top before bottom
    width, height = np.linalg.norm(tr - tl), np.linalg.norm(bl - tl)
    assert width == pytest.approx(80, abs=3) and height == pytest.approx(40, abs=3)
    assert np.degrees(np.arctan2(*(tr - tl)[::-1])) == pytest.approx(20, abs=3)
    assert body_corners(np.zeros((5, 5), bool)) is None


def test_a_film_renamed_by_one_level_is_found_one_level_off(film) -> None:
    patches = body_patches(film.image, film.label)
    assert sorted(patches) == sorted(set(np.unique(film.label)) - {0})
    other = _noisy(patches, 0)
    assert max(shift_scores(patches, other).items(), key=lambda kv: kv[1])[0] == 0
    scores = shift_scores(patches, _rename(other, 1))
    assert max(scores, key=scores.get) == 1
    scores = shift_scores(_rename(patches, 1), other)
    assert max(scores, key=scores.get) == -1


def test_offsets_explain_every_pair_and_name_the_odd_films(film) -> None:
    patches = body_patches(film.image, film.label)
    truth = np.array([0, 1, 0, 0, -1])
    films = [_rename(_noisy(patches, k), int(o)) for k, o in enumerate(truth)]
    offsets, scores = check_patient(films)
    np.testing.assert_array_equal(offsets, truth)  # the majority sits at 0
    assert set(scores) == {(i, j) for i in range(5) for j in range(i + 1, 5)}
    # with the majority renamed, the odd film is the other one
    offsets, _ = check_patient([films[1], films[1], films[0]])
    np.testing.assert_array_equal(offsets, [0, 0, -1])


def test_closure_counts_triples_whose_shifts_add_up() -> None:
    # patient 0: offsets 0, 1, 3 -> every triple closes; patient 1: one inconsistent shift
    consistent = {(0, 0, 1): 1, (0, 1, 2): 2, (0, 0, 2): 3}
    broken = {(1, 0, 1): 1, (1, 1, 2): 0, (1, 0, 2): 0}
    flat = {(2, 0, 1): 0, (2, 1, 2): 0, (2, 0, 2): 0}  # no shift: not counted
    assert closure({**consistent, **broken, **flat}, {0: 3, 1: 3, 2: 3}) == 0.5
    assert np.isnan(closure(flat, {2: 3}))
