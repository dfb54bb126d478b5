"""Learning every vertebra (target=levels) and the level-error metric."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from spineseg.config import build
from spineseg.data.datamodule import Prepared
from spineseg.data.synthetic import DOMAINS, film_rng, render_film
from spineseg.ensemble import metrics, stats
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import ConfigError, DataError
from spineseg.labels import level_value, region_mask, target_masks, vertebra_labels
from spineseg.models import levels as LV
from spineseg.models.module import metric_truth, probabilities
from spineseg.names import LEVELS, TARGET_VALUES

REPO = Path(__file__).resolve().parents[1]
#: experiment=tiny's sizes without its synthetic source options
TINY_FOLDER = [
    "data=folder", "data.image_size=[64,64]", "data.batch_size=4", "data.external=null",
    "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "ensemble.top_k=1",
]  # fmt: skip


def _film(i: int = 0, size: int = 192) -> np.ndarray:
    _, levels = render_film(film_rng(0, "internal", i), DOMAINS["internal"], size, size)
    return levels


def _shifted_region(levels: np.ndarray, shift: int) -> np.ndarray:
    """The region one would predict `shift` vertebrae too low (negative: too high)."""
    lo, hi = int(TARGET_VALUES[0]) + shift, int(TARGET_VALUES[-1]) + shift
    return ((levels >= lo) & (levels <= hi)).astype(np.uint8)


# ---------------------------------------------------------------------- the metric
@pytest.mark.parametrize("shift", [-1, 0, 1, 2])
def test_a_known_level_shift_gives_that_offset(shift: int) -> None:
    films = np.stack([_film(i) for i in range(4)])
    axis = metrics.spine_axis(vertebra_labels(films))
    pred = np.stack([_shifted_region(f, shift) for f in films])
    got = metrics.level_metrics(pred, axis)
    # vertebrae grow downwards, so a shift by k bodies is k pitches to within 0.2
    # (the phantoms always show Th7..L1; higher levels may be out of the field)
    np.testing.assert_allclose(got["level_offset"], shift, atol=0.2)
    np.testing.assert_array_equal(got["level_error"], float(shift != 0))
    assert np.isnan(got["four_in_order"]).all()  # region labels have no bodies to order


def test_half_a_pitch_is_the_boundary_and_empty_or_unknown_is_handled() -> None:
    truth = np.zeros((1, 80, 20), np.uint8)
    for k in range(4):
        truth[0, 10 + 10 * k : 18 + 10 * k, 5:15] = k + 1
    axis = metrics.spine_axis(truth)
    assert axis["pitch"][0] == pytest.approx(10.0)
    region = truth > 0
    for rows, error in ((4, 0.0), (6, 1.0)):  # 0.4 and 0.6 pitch
        got = metrics.level_metrics(np.roll(region, rows, axis=1), axis)
        assert got["level_offset"][0] == pytest.approx(rows / 10)
        assert got["level_error"][0] == error
    empty = metrics.level_metrics(np.zeros_like(region), axis)
    assert np.isnan(empty["level_offset"][0]) and empty["level_error"][0] == 1.0
    no_th11 = metrics.spine_axis(np.where(truth == 4, 0, truth))
    unknown = metrics.level_metrics(region, no_th11)
    assert np.isnan(unknown["level_offset"][0]) and np.isnan(unknown["level_error"][0])


def test_spacing_makes_a_stretched_film_isotropic() -> None:
    truth = np.zeros((1, 80, 40), np.uint8)
    for k in range(4):  # a tilted spine: each body 10 rows lower and 4 columns right
        truth[0, 10 + 10 * k : 16 + 10 * k, 4 + 4 * k : 14 + 4 * k] = k + 1
    pred = np.roll(truth > 0, 10, axis=1)  # one body too low
    square = metrics.level_metrics(pred, metrics.spine_axis(truth, spacing=(1.0, 1.0)))
    stretched = metrics.level_metrics(pred, metrics.spine_axis(truth, spacing=(2.0, 1.0)))
    assert 0.8 < square["level_offset"][0] < 1.0  # a row shift is partly across a tilted axis
    assert stretched["level_offset"][0] > square["level_offset"][0]  # rows weigh more in mm


def test_four_bodies_in_order_on_constructed_masks() -> None:
    truth = np.zeros((1, 80, 20), np.uint8)
    for k in range(4):
        truth[0, 10 + 10 * k : 18 + 10 * k, 5:15] = k + 1
    axis = metrics.spine_axis(truth)
    assert metrics.level_metrics(truth, axis)["four_in_order"][0] == 1.0
    swapped = truth.copy()
    swapped[truth == 1], swapped[truth == 2] = 2, 1
    assert metrics.level_metrics(swapped, axis)["four_in_order"][0] == 0.0
    split = truth.copy()
    split[0, 13, :] = 0  # Th8 in two pieces
    assert metrics.level_metrics(split, axis)["four_in_order"][0] == 0.0
    missing = np.where(truth == 3, 0, truth)
    assert metrics.level_metrics(missing, axis)["four_in_order"][0] == 0.0


def test_wilson_interval_of_a_rate() -> None:
    none = stats.proportion_ci(np.zeros(37))
    assert none["rate"] == 0.0 and none["ci_low"] == 0.0 and 0.05 < none["ci_high"] < 0.12
    some = stats.proportion_ci([1, 0, 0, 0, np.nan])
    assert some["n"] == 4 and some["rate"] == 0.25 and some["ci_low"] < 0.25 < some["ci_high"]
    assert np.isnan(stats.proportion_ci([np.nan])["rate"])


# ---------------------------------------------------------------------- targets
def test_targets_derive_from_level_values() -> None:
    levels = _film()
    binary = np.zeros(1, bool)
    region = target_masks(levels[None], binary, "region")[0]
    np.testing.assert_array_equal(region, region_mask(levels))
    vertebrae = target_masks(levels[None], binary, "vertebrae")[0]
    assert set(np.unique(vertebrae).tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(vertebrae > 0, region > 0)
    np.testing.assert_array_equal(target_masks(levels[None], binary, "levels")[0], levels)
    # a dataset labelling only Th8..Th11 cannot teach the other levels: one clear line
    only_four = np.where(region > 0, levels, 0)[None]
    with pytest.raises(DataError, match="labels only Th8, Th9, Th10, Th11: use target=vertebrae"):
        target_masks(only_four, binary, "levels")
    with pytest.raises(DataError, match="needs per-vertebra masks"):
        target_masks(region[None], np.ones(1, bool), "levels", ["film-a"])


def test_levels_probabilities_gate_the_region_levels_on_the_vertebra_channel() -> None:
    logits = torch.randn(2, LV.channels("classes"), 8, 8)
    region = probabilities(logits, "levels", "classes")
    soft = torch.softmax(logits[:, 1:], 1)
    assert region.shape == (2, 1, 8, 8)
    index = torch.as_tensor((TARGET_VALUES - 1).astype(np.int64))
    expected = torch.sigmoid(logits[:, :1]) * soft[:, index].sum(1, keepdim=True)
    torch.testing.assert_close(region, expected)
    # ordinal: the level as a number; inside Th8..Th11 the region is P(vertebra)
    out = torch.zeros(1, 2, 1, 4)
    out[0, 0] = 20.0  # surely a vertebra
    level = torch.tensor([level_value(n) for n in ("Th6", "Th8", "Th11", "L1")], dtype=torch.float)
    out[0, 1, 0] = (level - (len(LEVELS) + 1) / 2) / (len(LEVELS) / 2)
    got = probabilities(out, "levels", "ordinal")[0, 0, 0]
    assert got[0] < 1e-3 and got[1] > 0.99 and got[2] > 0.99 and got[3] < 1e-3
    assert LV.channels("ordinal") == 2 and LV.level_of(out[:, 1:2]).allclose(level.view(1, 1, 1, 4))
    mask = torch.tensor([[0, level_value("Th7"), level_value("Th8"), level_value("Th11")]])
    assert metric_truth(mask, "levels").tolist() == [[0, 0, 1, 1]]
    assert LEVELS[level_value("T8") - 1] == "Th8"  # AASCE's spelling is accepted


def test_prepared_vertebrae_are_blank_on_binary_films() -> None:
    levels = np.stack([_film(0, 64), (region_mask(_film(1, 64)))])
    part = Prepared(
        ["a", "b"], ["a", "b"], [None, None], np.zeros_like(levels), levels,
        np.array([False, True]), np.full((2, 2), np.nan, np.float32), [{}, {}],
    )  # fmt: skip
    v = part.vertebrae()
    assert set(np.unique(v[0]).tolist()) == {0, 1, 2, 3, 4} and not v[1].any()


# ---------------------------------------------------------------------- end to end
def _folder_with_17_levels(root: Path, n: int = 20, size: int = 128) -> Path:
    """A folder dataset whose masks label T1..L5 as 1..17 (AASCE's vertebrae)."""
    spine = [level_value(f"Th{i}") for i in range(1, 13)] + [
        level_value(f"L{i}") for i in range(1, 6)
    ]
    lut = np.zeros(256, np.uint8)
    for value, level in enumerate(spine, start=1):
        lut[level] = value
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, levels = render_film(film_rng(3, "internal", i), DOMAINS["internal"], size, size)
        cv2.imwrite(str(root / "images" / f"f{i:02d}.png"), image)
        cv2.imwrite(str(root / "masks" / f"f{i:02d}.png"), lut[levels])
    return root


def test_a_folder_dataset_with_17_levels_trains_in_levels_mode(tmp_path: Path) -> None:
    data = _folder_with_17_levels(tmp_path / "data")
    levels = "[" + ",".join([f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]) + "]"
    cmd = [
        sys.executable, "-m", "spineseg.cli.train", *TINY_FOLDER, "name=tiny",
        f"data.root={data}", f"data.source_kwargs.levels={levels}", "data.target=levels",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}", "hydra.job_logging.root.level=WARNING",
    ]  # fmt: skip
    env = {**os.environ, "SPINESEG_PROGRESS": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    store = PredictionStore(tmp_path / "out" / "tiny" / "default")
    probs = np.asarray(store.probs("unet_lite0", "test"))
    assert probs.shape[1] == 1  # the store holds the derived region, like a region model
    truth = store.truth("test")
    assert set(np.unique(truth.masks).tolist()) <= {0, 1}
    assert truth.vertebrae is not None and set(np.unique(truth.vertebrae).tolist()) == {
        0, 1, 2, 3, 4,
    }  # fmt: skip
    np.testing.assert_array_equal(truth.vertebrae > 0, truth.masks > 0)

    res = subprocess.run(
        [sys.executable, "-m", "spineseg.cli.ensemble", f"run_dir={store.run_dir}",
         "ensemble.top_k=1", "ensemble.figures=false", "ensemble.n_boot=50"],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    per_image = pd.read_csv(store.run_dir / "ensemble" / "per_image.csv")
    assert per_image["level_error"].isin([0.0, 1.0]).all()
    results = pd.read_csv(store.run_dir / "ensemble" / "results.csv")
    rate = results.set_index(["split", "method"]).loc[("test", "soft"), "level_error_rate"]
    soft = per_image[(per_image["split"] == "test") & (per_image["method"] == "soft")]
    assert rate == pytest.approx(soft["level_error"].mean())
    assert "level errors [95% CI]" in (store.run_dir / "ensemble" / "results.md").read_text()


def test_levels_mode_on_a_four_level_dataset_is_refused_before_training(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(12):
        image, levels = render_film(film_rng(4, "internal", i), DOMAINS["internal"], 64, 64)
        cv2.imwrite(str(data / "images" / f"f{i:02d}.png"), image)
        cv2.imwrite(str(data / "masks" / f"f{i:02d}.png"), vertebra_labels(levels))

    dm = build(
        "data", ["data=folder"], root=str(data), target="levels", image_size=(64, 64),
        cache_dir=str(tmp_path / "cache"), external=None,
    )  # fmt: skip
    with pytest.raises(DataError, match="labels only Th8, Th9, Th10, Th11: use target=vertebrae"):
        dm.setup("fit")  # a DataError: the CLIs print it as one line


@pytest.mark.parametrize("encoding", LV.ENCODINGS)
def test_levels_loss_learns_vertebra_and_level_on_one_film(encoding: str) -> None:
    """A few optimiser steps on one phantom: the loss falls, and the vertebra channel and
    the level term both get gradients (the level term only from vertebra pixels)."""
    torch.manual_seed(0)
    levels = torch.from_numpy(_film(0, 64).astype(np.int64))[None]
    module = build("module", weights=None, target="levels", levels_encoding=encoding)
    assert module.net.segmentation_head[0].out_channels == LV.channels(encoding)
    x = torch.randn(1, 1, 64, 64)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = module.loss(module(x), levels)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    background = torch.zeros_like(levels)
    assert torch.isfinite(module.loss(module(x), background))  # no vertebra: no level term
    with pytest.raises(ConfigError, match="unknown levels encoding 'onehot'"):
        build("module", weights=None, target="levels", levels_encoding="onehot")
