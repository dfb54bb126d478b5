"""Per-image metrics: hand-computed cases, the documented empty conventions, and agreement
with set computations and MONAI's reference implementations on random masks."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from scipy import ndimage

from spineseg.ensemble.metrics import overlap_metrics, overlap_scores, surface_metrics
from spineseg.models.scores import OverlapScore


def blobs(rng: np.random.Generator, n: int, h: int, w: int, num_classes: int = 2) -> np.ndarray:
    """Smooth random label maps (N, H, W): realistic connected regions, not salt noise."""
    x = ndimage.gaussian_filter(rng.random((n, h, w)), sigma=(0, 3, 3))
    if num_classes == 2:
        return (x > np.quantile(x, 0.65, axis=(1, 2), keepdims=True)).astype(np.int64)
    edges = np.quantile(x, np.linspace(0.4, 1, num_classes)[:-1], axis=(1, 2))  # (C-1, N)
    return (x[None] > edges[:, :, None, None]).sum(0).astype(np.int64)


def one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, C, H, W) float one-hot, MONAI's input format."""
    t = torch.from_numpy(labels)
    return torch.nn.functional.one_hot(t, num_classes).permute(0, 3, 1, 2).float()


def monai_surface(pred, truth, num_classes, spacing=None):
    """MONAI HD95 and symmetric ASSD per image and foreground class, (N, C-1) each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, t = one_hot(pred, num_classes), one_hot(truth, num_classes)
        hd = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing).numpy()
        asd = compute_average_surface_distance(p, t, symmetric=True, spacing=spacing).numpy()
    return hd, asd


# --- overlap ---------------------------------------------------------------------------------


def test_overlap_hand_computed():
    pred = np.zeros((1, 4, 4), dtype=np.int64)
    truth = np.zeros((1, 4, 4), dtype=np.int64)
    pred[0, 0, :4] = 1  # 4 pixels
    truth[0, 0, 1:4] = 1  # 3 of them overlap
    truth[0, 1, :3] = 1  # truth has 6 pixels
    out = overlap_metrics(pred, truth, 2)
    assert out["dice"][0] == pytest.approx(6 / 10)
    assert out["iou"][0] == pytest.approx(3 / 7)
    assert out["precision"][0] == pytest.approx(3 / 4)
    assert out["recall"][0] == pytest.approx(3 / 6)


def test_overlap_empty_conventions():
    empty = np.zeros((4, 5), dtype=np.int64)
    some = empty.copy()
    some[1:3, 1:3] = 1
    pred = np.stack([empty, empty, some, some])
    truth = np.stack([empty, some, empty, some])
    out = overlap_metrics(pred, truth, 2)
    for key in ("dice", "iou", "precision", "recall"):
        # both empty -> 1 ; exactly one empty -> 0 ; identical -> 1
        assert out[key].tolist() == [1.0, 0.0, 0.0, 1.0], key


def test_overlap_binary_counts_any_nonzero_label_as_foreground():
    pred = np.array([[[0, 2, 3, 0]]])
    truth = np.array([[[0, 1, 1, 1]]])
    assert overlap_metrics(pred, truth, 2)["dice"][0] == pytest.approx(2 * 2 / 5)


def test_overlap_multiclass_absent_class_counts_as_one():
    truth = np.array([[[1, 1, 0, 0]]])
    perfect = overlap_metrics(truth, truth, 3)
    assert perfect["dice"][0] == 1.0  # class 1 perfect, class 2 absent from both -> 1
    pred = np.array([[[1, 1, 2, 0]]])
    out = overlap_metrics(pred, truth, 3)
    assert out["dice"][0] == pytest.approx((1 + 0) / 2)  # class 2 only predicted -> 0
    assert out["precision"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        overlap_metrics(np.array([[[3]]]), np.array([[[0]]]), 3)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_overlap_matches_set_computations_and_monai(num_classes):
    rng = np.random.default_rng(num_classes)
    pred, truth = blobs(rng, 6, 24, 20, num_classes), blobs(rng, 6, 24, 20, num_classes)
    out = overlap_metrics(torch.from_numpy(pred), truth, num_classes)
    p1h, t1h = one_hot(pred, num_classes), one_hot(truth, num_classes)
    monai_dice = compute_dice(p1h, t1h, include_background=False).numpy()
    monai_iou = compute_iou(p1h, t1h, include_background=False).numpy()
    for i in range(len(pred)):
        per_class = {k: [] for k in out}
        for c in range(1, num_classes):
            p = set(zip(*np.nonzero(pred[i] == c), strict=True))
            t = set(zip(*np.nonzero(truth[i] == c), strict=True))
            assert p and t  # the random maps hold every class, so no convention is involved
            inter = len(p & t)
            per_class["dice"].append(2 * inter / (len(p) + len(t)))
            per_class["iou"].append(inter / len(p | t))
            per_class["precision"].append(inter / len(p))
            per_class["recall"].append(inter / len(t))
        for key, vals in per_class.items():
            assert out[key][i] == pytest.approx(np.mean(vals), abs=1e-12), key
        assert out["dice"][i] == pytest.approx(monai_dice[i].mean(), abs=1e-6)
        assert out["iou"][i] == pytest.approx(monai_iou[i].mean(), abs=1e-6)


# --- surface ---------------------------------------------------------------------------------


def test_surface_hand_computed_single_pixels():
    pred = np.zeros((1, 3, 5), dtype=np.int64)
    truth = np.zeros_like(pred)
    pred[0, 0, 0] = 1
    truth[0, 0, 3] = 1  # 3 columns away
    out = surface_metrics(pred, truth, 2)
    assert out["hd95"][0] == pytest.approx(3.0)
    assert out["assd"][0] == pytest.approx(3.0)
    mm = surface_metrics(pred, truth, 2, spacing=(0.5, 2.0))  # (row, col) mm
    assert mm["hd95"][0] == pytest.approx(6.0)
    assert mm["assd"][0] == pytest.approx(6.0)


def test_surface_empty_conventions():
    h, w = 12, 7
    empty = np.zeros((h, w), dtype=np.int64)
    some = empty.copy()
    some[3:6, 2:5] = 1
    pred = np.stack([empty, empty, some])
    truth = np.stack([empty, some, empty])
    out = surface_metrics(pred, truth, 2)
    diag = math.hypot(h, w)
    assert out["hd95"].tolist() == pytest.approx([0.0, diag, diag])
    assert out["assd"].tolist() == pytest.approx([0.0, diag, diag])
    mm = surface_metrics(pred, truth, 2, spacing=(0.5, 3.0))
    assert mm["hd95"][1] == pytest.approx(math.hypot(h * 0.5, w * 3.0))
    # MONAI has no finite answer here (inf or nan), which is why we define one.
    hd, _ = monai_surface(pred, truth, 2)
    assert not np.isfinite(hd[1:, 0]).any()


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((5, 40, 40), None), ((4, 96, 32), None), ((4, 96, 32), (0.5, 1.7)), ((3, 30, 64), 0.8)],
)
def test_surface_matches_monai_binary(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    pred, truth = blobs(rng, *shape), blobs(rng, *shape)
    out = surface_metrics(pred, truth, 2, spacing=spacing)
    hd, asd = monai_surface(pred, truth, 2, spacing=spacing)
    np.testing.assert_allclose(out["hd95"], hd[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["assd"], asd[:, 0], atol=1e-4, rtol=0)


def test_surface_per_image_spacing_and_anisotropy():
    rng = np.random.default_rng(7)
    pred, truth = blobs(rng, 3, 96, 32), blobs(rng, 3, 96, 32)
    spacing = np.array([[0.2, 0.9], [1.0, 1.0], [2.5, 0.4]])
    out = surface_metrics(pred, truth, 2, spacing=spacing)
    hd, asd = monai_surface(pred, truth, 2, spacing=spacing.tolist())
    np.testing.assert_allclose(out["hd95"], hd[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["assd"], asd[:, 0], atol=1e-4, rtol=0)
    # Swapping row/col spacing must change the answer on anisotropic pixels.
    swapped = surface_metrics(pred, truth, 2, spacing=spacing[:, ::-1])
    assert not np.allclose(swapped["hd95"], out["hd95"])


def test_surface_matches_monai_multiclass_and_border_touching_masks():
    rng = np.random.default_rng(11)
    pred, truth = blobs(rng, 4, 48, 36, 5), blobs(rng, 4, 48, 36, 5)
    pred[0, :, :4] = 4  # touch the image border: edges there come from the zero border
    out = surface_metrics(pred, truth, 5)
    hd, asd = monai_surface(pred, truth, 5)
    np.testing.assert_allclose(out["hd95"], hd.mean(1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["assd"], asd.mean(1), atol=1e-4, rtol=0)


def test_surface_multiclass_averages_present_classes_only():
    pred = np.zeros((2, 6, 6), dtype=np.int64)
    truth = np.zeros_like(pred)
    pred[0, 0, 0] = truth[0, 0, 3] = 1  # class 1: distance 3; classes 2, 3 absent
    pred[0, 5, 5] = 3  # class 3: predicted only -> diagonal penalty
    out = surface_metrics(pred, truth, 4)
    assert out["hd95"][0] == pytest.approx((3 + math.hypot(6, 6)) / 2)
    assert out["hd95"][1] == 0.0  # nothing anywhere
    assert out["assd"][1] == 0.0


def test_surface_speed_16_images_256():
    rng = np.random.default_rng(0)
    pred, truth = blobs(rng, 16, 256, 256), blobs(rng, 16, 256, 256)
    start = time.perf_counter()
    out = surface_metrics(pred, truth, 2)
    elapsed = time.perf_counter() - start
    assert np.isfinite(out["hd95"]).all()
    assert elapsed < 2.0  # ~0.1 s measured; generous for a shared CPU


def test_shape_and_spacing_validation():
    a = np.zeros((2, 4, 4), dtype=np.int64)
    with pytest.raises(ValueError):
        overlap_metrics(a, a[:1], 2)
    with pytest.raises(ValueError):
        surface_metrics(a, a, 2, spacing=(1.0, -1.0))
    with pytest.raises(ValueError):
        surface_metrics(a, a, 2, spacing=np.ones((3, 2)))
    with pytest.raises(ValueError):
        overlap_metrics(a.astype(np.float32), a, 2)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_the_training_metric_scores_tensors_where_they_are_with_the_same_numbers(num_classes):
    rng = np.random.default_rng(10 + num_classes)
    pred, truth = blobs(rng, 7, 24, 20, num_classes), blobs(rng, 7, 24, 20, num_classes)
    pred[0], truth[0] = 0, 0  # both empty: 1 by convention, on either path
    want = overlap_metrics(pred, truth, num_classes)
    got = overlap_scores(torch.from_numpy(pred), torch.from_numpy(truth), num_classes)
    for key, value in got.items():
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float64
        np.testing.assert_allclose(value.numpy(), want[key], rtol=0, atol=1e-12)
    # On the meta device nothing can be copied to the host: the core stays on the device.
    meta = overlap_scores(torch.from_numpy(pred).to("meta"), torch.from_numpy(truth).to("meta"),
                          num_classes)["dice"]  # fmt: skip
    assert meta.device.type == "meta" and meta.shape == (7,)
    score = OverlapScore("dice", num_classes)
    for lo in range(0, 7, 3):  # uneven batches: the mean is over images, not batches
        score.update(torch.from_numpy(pred[lo : lo + 3]), torch.from_numpy(truth[lo : lo + 3]))
    assert float(score.compute()) == pytest.approx(float(want["dice"].mean()), abs=1e-6)
