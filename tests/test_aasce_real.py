"""The AASCE adapter on the real training split (481 films), when it is on this machine.

Films are converted one at a time (all 481 at full resolution would hold ~2 GB at once).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from spineseg.data.aasce import list_films, load_film, patient_key, select_subset, vertebra_polygons
from spineseg.labels import vertebra_labels

REAL_ROOT = Path(
    os.environ.get("SPINESEG_AASCE_ROOT")
    or Path(__file__).resolve().parents[1].parent / "shared/data/aasce-train"
)

pytestmark = [
    pytest.mark.aasce,
    pytest.mark.skipif(
        not (REAL_ROOT / "labels/training").is_dir(), reason=f"no AASCE data at {REAL_ROOT}"
    ),
]


@pytest.fixture(scope="module")
def films():
    root = REAL_ROOT
    return list_films(root / "data/training", root / "labels/training", "auto", "raise", None)


def test_every_film_converts_with_four_vertebrae_inside_the_image(films):
    assert len(films) == 481
    for film in films:
        sample = load_film(film)
        sample.check()
        height, width = sample.image.shape
        label = vertebra_labels(sample.label)
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}, film.name
        for quad in vertebra_polygons(sample.meta["landmarks"]):
            assert (quad >= -0.5).all() and (quad <= [width - 0.5, height - 0.5]).all(), film.name
        rows = [np.nonzero((label == v).any(axis=1))[0].mean() for v in range(1, 5)]
        assert rows == sorted(rows), f"{film.name}: Th8..Th11 not top to bottom"


def test_patient_keys_on_the_real_names(films):
    names = [f.name for f in films]
    unrecognised = [n for n in names if not patient_key(n)[1]]
    assert all("coronal" in n for n in unrecognised), unrecognised
    per_patient = Counter(patient_key(n)[0] for n in names)
    assert per_patient["192"] == 2 and per_patient["162"] == 2
    assert len(per_patient) < len(names)  # follow-up films exist and are grouped


def test_paper_subsets_are_183_and_58_films_of_disjoint_patients(films):
    names = [f.name for f in films]
    internal = select_subset(names, "internal", 183, 58, seed=0)
    external = select_subset(names, "external", 183, 58, seed=0)
    assert (len(internal), len(external)) == (183, 58)
    assert not {patient_key(n)[0] for n in internal} & {patient_key(n)[0] for n in external}
