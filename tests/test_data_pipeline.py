"""Splits, geometry, preprocessing and the DataModule on synthetic films."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spineseg.config import build
from spineseg.data import geometry as G
from spineseg.data import transforms as T
from spineseg.data.splits import read_splits_csv, split_by_patient
from spineseg.errors import ConfigError, DataError

SMALL = {"n": 30, "height": 128, "width": 128}


def _dm(tmp_path, **kw):
    args = {
        "source_kwargs": SMALL,
        "image_size": (64, 64),
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        "run_dir": str(tmp_path / "run"),
        "external": {
            "source": "synthetic",
            "source_kwargs": {**SMALL, "n": 6, "domain": "external", "seed": 1},
        },
    }
    args.update(kw)
    return build("data", **args)


def test_patient_split_is_disjoint_reproducible_and_paper_sized():
    ids = [f"f{i}" for i in range(183)]
    a = split_by_patient(ids, ids, (0.7, 0.1, 0.2), seed=3)
    assert a == split_by_patient(ids, ids, (0.7, 0.1, 0.2), seed=3)
    assert a != split_by_patient(ids, ids, (0.7, 0.1, 0.2), seed=4)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 128, "val": 18, "test": 37}


def test_patients_never_span_splits_and_forced_splits_hold():
    rng = np.random.default_rng(0)
    ids = [f"f{i}" for i in range(100)]
    patients = [f"p{rng.integers(0, 35)}" for _ in ids]
    forced = [None] * 100
    forced[0] = "test"
    a = split_by_patient(ids, patients, seed=1, forced=forced)
    by_patient: dict[str, set] = {}
    for i, p in zip(ids, patients, strict=True):
        by_patient.setdefault(p, set()).add(a[i])
    assert all(len(s) == 1 for s in by_patient.values())
    assert all(a[i] == "test" for i, p in zip(ids, patients, strict=True) if p == patients[0])


def test_bad_fractions_are_rejected():
    with pytest.raises(ConfigError, match="fractions"):
        split_by_patient(["a"], ["a"], (0.5, 0.5, 0.5))


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_geometry_round_trip_on_a_tall_film(mode):
    image = np.zeros((300, 100), np.uint8)
    label = np.zeros((300, 100), np.uint8)
    label[100:200, 30:70] = 3
    img, lab, g = G.to_working(image, label, (128, 64), mode)
    assert img.shape == lab.shape == (128, 64)
    assert set(np.unique(lab)) == {0, 3}  # nearest neighbour: no blended labels
    back = G.to_original(lab, g, nearest=True)
    assert back.shape == label.shape
    inter = ((back == 3) & (label == 3)).sum()
    assert inter / (label == 3).sum() > 0.9
    if mode == "letterbox":
        assert g.scale_x == g.scale_y and g.pad_left > 0


def test_image_size_must_be_divisible_by_32(tmp_path):
    with pytest.raises(ConfigError, match="multiples of 32"):
        _dm(tmp_path, image_size=(100, 64))


@pytest.mark.parametrize("name", list(T.PREPROCESS))
def test_preprocessing_is_deterministic_uint8(name):
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64)) * 180 + 20).astype(np.uint8)
    a, b = T.preprocess(img, name), T.preprocess(img, name)
    assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    if name != "none":
        assert not np.array_equal(a, img)


def test_unknown_presets_name_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"valid choices: .*clahe"):
        _dm(tmp_path, preprocess="clahee")
    with pytest.raises(ConfigError, match=r"valid choices: .*strong"):
        _dm(tmp_path, augment="heavy")


def test_an_option_the_source_does_not_take_names_it_and_the_choices():
    from spineseg.data.sources import build_source

    with pytest.raises(ConfigError, match=r"the synthetic source takes no option 'root' .*"
                       r"its options: n, domain, seed, height, width$"):  # fmt: skip
        build_source("synthetic", root="/films", n=4)


def test_datamodule_splits_batches_and_cache(tmp_path):
    dm = _dm(tmp_path)
    dm.setup()
    sizes = {k: len(v.ids) for k, v in dm.parts.items()}
    assert sizes == {"train": 21, "val": 3, "test": 6, "external": 6}
    ids = [set(dm.parts[s].ids) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert read_splits_csv(tmp_path / "run" / "splits.csv") == {
        i: s for s in ("train", "val", "test") for i in dm.parts[s].ids
    }
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.float32
    assert set(torch.unique(batch["mask"]).tolist()) <= {0, 1}
    assert list(dm.test_dataloader()) and len(dm.test_dataloader()) == 2
    assert list((tmp_path / "cache").glob("synthetic-*.npz"))
    # a second module (new process in a sweep) reads the same arrays from the cache
    from spineseg.data import datamodule as D

    D._MEMORY_CACHE.clear()
    dm2 = _dm(tmp_path)
    dm2.setup()
    assert np.array_equal(dm2.parts["train"].images, dm.parts["train"].images)


def test_vertebrae_target_has_four_classes(tmp_path):
    dm = _dm(tmp_path, target="vertebrae", external=None)
    dm.setup()
    masks = dm.parts["train"].masks("vertebrae")
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4}


def test_splits_file_from_another_dataset_is_refused(tmp_path):
    _dm(tmp_path).setup()
    from spineseg.data import datamodule as D

    D._MEMORY_CACHE.clear()
    with pytest.raises(DataError, match=r"splits\.csv does not match"):
        _dm(tmp_path, source_kwargs={**SMALL, "seed": 5, "n": 12}).setup()


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="yielded no films"):
        _dm(tmp_path, source_kwargs={**SMALL, "n": 0}, external=None).setup()


def test_augmentation_is_reproducible_under_a_seed(tmp_path):
    def first_batch():
        torch.manual_seed(7)
        dm = _dm(tmp_path, augment="strong", external=None)
        dm.setup()
        torch.manual_seed(7)
        return next(iter(dm.train_dataloader()))["image"]

    assert torch.equal(first_batch(), first_batch())


@pytest.mark.parametrize("preset", sorted(T.REFRAME_P))
def test_reframe_cuts_and_moves_the_film_and_its_mask_together(preset):
    """`reframe` (and `reframe_mild`, less often) must move where the film starts and ends
    (so a network cannot read the level off the height on the film), keep the working size,
    and never part a mask from its pixels."""
    h, w = 128, 64
    film = np.zeros((h, w), np.uint8)
    film[:, 8:56] = 200  # the film's content
    mask = np.zeros((h, w), np.uint8)
    mask[50:80, 20:44] = 1
    film[mask > 0] = 100  # the region is visible in the film
    aug = T.build_augment(preset, (h, w), seed=0)
    tops, rows_kept = [], []
    for _ in range(200):
        out = aug(image=film, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape == (h, w) and m.shape == (h, w)
        content = np.flatnonzero((img > 0).any(axis=1))
        tops.append(content[0])
        rows_kept.append(content.size)
        # the mask lies on region pixels: flips and shifts applied to both alike
        assert m.sum() and (img[m > 0] > 0).all()
    assert len(set(tops)) > 5 and min(rows_kept) < 0.75 * h  # `light` alone keeps > 0.85
    # the share of films cut deep follows the preset's probability
    deep = np.mean(np.array(rows_kept) < 0.85 * h)
    assert 0.25 * T.REFRAME_P[preset] < deep < T.REFRAME_P[preset] + 0.1
