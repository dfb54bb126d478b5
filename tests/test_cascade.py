"""The coarse-to-fine cascade: boxes, their exact inverse, the training and held-out crops,
the refusal of a leaking stage 1, and predict as crop -> stage 2 -> paste."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from test_predict import film, make_run

from spineseg.config import build
from spineseg.data.cascade import (
    Box,
    CropSpec,
    grow,
    predicted_crop,
    region_box,
    training_crop,
)
from spineseg.data.sources import build_source
from spineseg.errors import ConfigError, DataError
from spineseg.predict import load_ensemble

SMALL = {"n": 24, "height": 160, "width": 96}


def test_a_box_crops_and_pastes_back_exactly() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65535, (300, 120), dtype=np.uint16)
    box = Box(40, 10, 200, 100)
    part = box.crop(image)
    back = box.paste(part, image.shape)
    assert np.array_equal(box.crop(back), part) and np.array_equal(part, image[40:200, 10:100])
    outside = np.ones(image.shape, bool)
    outside[40:200, 10:100] = False
    assert not back[outside].any()
    with pytest.raises(ValueError, match="does not fit"):
        box.paste(part[:-1], image.shape)


def test_grow_clamps_to_the_film_and_says_so() -> None:
    inner, clamped = grow(Box(100, 40, 140, 60), 0.5, (300, 120))
    assert inner == Box(80, 20, 160, 80) and not clamped
    edge, clamped = grow(Box(5, 100, 45, 118), 0.5, (300, 120))
    assert edge == Box(0, 80, 65, 120) and clamped
    assert region_box(np.zeros((4, 4))) is None
    assert region_box(np.pad(np.ones((2, 3)), ((1, 1), (2, 0)))) == Box(1, 2, 3, 5)


def test_training_crops_are_seeded_by_the_film_and_hold_its_truth() -> None:
    spec = CropSpec("unused", margin=0.5, jitter=0.15)
    samples = build_source("synthetic", **SMALL)
    for s in samples:
        a, b = training_crop(s, spec), training_crop(s, spec)
        assert a == b and a.source == "truth"  # the same film, the same box, every job
        truth = region_box((s.label >= 15) & (s.label <= 18))
        box = a.box
        assert box.y0 <= truth.y0 and box.y1 >= truth.y1  # a margin of half the height
        assert box.x0 <= truth.x0 and box.x1 >= truth.x1  # beats a 15% shift
    assert len({training_crop(s, spec).box.height for s in samples}) > 1  # jittered


def test_a_stage1_that_finds_nothing_gives_the_whole_film() -> None:
    crop = predicted_crop(np.zeros((200, 80), np.uint8), CropSpec("unused"))
    assert crop.source == "whole" and crop.box == Box(0, 0, 200, 80)


@pytest.mark.parametrize(
    ("crop", "match"),
    [
        ({"margin": 0.5}, "needs stage1"),
        ({"stage1": "x", "margin": 5}, "margin=5.0 must be in"),
        ({"stage1": "x", "jitter": 0.7}, "jitter=0.7 must be in"),
        ({"stage1": "x", "pad": 1}, "unknown option 'pad'"),
    ],
)
def test_bad_crop_options_are_one_line(crop, match) -> None:
    with pytest.raises(ConfigError, match=match):
        CropSpec.from_config(crop)


def _stage2_run(tmp_path: Path, stage1: Path) -> Path:
    crop = {"stage1": str(stage1), "rule": "soft", "margin": 0.5, "jitter": 0.15}
    run = make_run(tmp_path / "stage2", crop=crop)
    return run


def test_predict_is_stage1_crop_then_stage2_then_paste(tmp_path) -> None:
    stage1 = make_run(tmp_path / "stage1")
    stage2 = _stage2_run(tmp_path, stage1)
    ens = load_ensemble(stage2, rule="soft")
    assert ens.stage1 is not None and ens.pipeline.crop.stage1 == str(stage1)
    image = film(240, 100)
    got = ens.predict(image)
    first = ens.stage1.predict(image)
    crop = predicted_crop(first.labels, ens.pipeline.crop)
    alone = ens._without_stage1().predict(crop.box.crop(image))
    assert got.box == crop.box and got.labels.shape == image.shape
    np.testing.assert_array_equal(got.probability, crop.box.paste(alone.probability, image.shape))
    np.testing.assert_array_equal(got.labels, crop.box.paste(alone.labels, image.shape))
    if crop.source == "whole":
        assert got.notes


def test_the_datamodule_crops_every_split_and_every_job_reads_one_record(tmp_path) -> None:
    stage1 = make_run(tmp_path / "stage1")
    opts = {"source_kwargs": SMALL, "image_size": (64, 64), "cache_dir": str(tmp_path / "c"),
            "external": None, "batch_size": 4}  # fmt: skip
    build("data", **opts, run_dir=str(stage1)).setup()  # stage 1's splits.csv
    crop = {"stage1": str(stage1), "margin": 0.5, "jitter": 0.15}
    run = tmp_path / "stage2"
    dm = build("data", **opts, crop=crop, run_dir=str(run))
    dm.setup()
    assert dm.parts["val"].images.shape[1:] == (64, 64)
    with open(run / "crops.csv") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    assert len(rows) == SMALL["n"]
    for r in rows:
        assert r["source"] in (("truth",) if r["split"] == "train" else ("stage1", "whole"))
        assert 0 <= int(r["y0"]) < int(r["y1"]) <= int(r["height"])
    before = (run / "crops.csv").read_text()
    again = build("data", **opts, crop=crop, run_dir=str(run))
    again.setup()  # the next job of the sweep: the same boxes, read back
    assert (run / "crops.csv").read_text() == before
    np.testing.assert_array_equal(again.parts["test"].images, dm.parts["test"].images)


def test_a_stage1_trained_on_held_out_films_is_refused(tmp_path) -> None:
    stage1 = make_run(tmp_path / "stage1")
    opts = {"source_kwargs": SMALL, "image_size": (64, 64), "cache_dir": str(tmp_path / "c"),
            "external": None}  # fmt: skip
    build("data", **opts, split_seed=7, run_dir=str(stage1)).setup()  # another split
    crop = {"stage1": str(stage1)}
    with pytest.raises(DataError, match=r"stage 1 trained on \d+ film"):
        build("data", **opts, crop=crop, run_dir=str(tmp_path / "stage2")).setup()


def test_a_stage1_without_an_ensemble_is_refused_before_any_film(tmp_path, compose_train) -> None:
    from spineseg.checks import check_run

    cfg = compose_train("experiment=tiny", f"data.crop={{stage1:{tmp_path / 'nothing'}}}")
    with pytest.raises(ConfigError, match=r"has no ensemble/selection\.json"):
        check_run(cfg)
    cfg = compose_train("experiment=tiny", f"data.crop={{stage1:{tmp_path},margin:9}}")
    with pytest.raises(ConfigError, match=r"margin=9\.0 must be in"):
        check_run(cfg)
