"""The embedded synthetic dataset: determinism, exact labels, no shortcut to Th8..Th11,
a real domain shift, and the gallery CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from spineseg.data.sample import Sample
from spineseg.data.synthetic import (
    DOMAINS,
    LABELS,
    LEVELS,
    RIB_LEVELS,
    Anatomy,
    film_rng,
    render_film,
    synthetic_source,
)
from spineseg.errors import ConfigError
from spineseg.labels import level_value, vertebra_labels
from spineseg.names import TARGET_LEVELS

REPO = Path(__file__).resolve().parents[1]
N_FILMS = 40  # per domain for the statistical checks
SIZE = 256


def _render(domain: str, i: int, ideal: bool = False) -> tuple[np.ndarray, np.ndarray, Anatomy]:
    return render_film(film_rng(0, domain, i), DOMAINS[domain], SIZE, SIZE, True, ideal=ideal)


@pytest.fixture(scope="module")
def films() -> dict[str, list[tuple[np.ndarray, np.ndarray, Anatomy]]]:
    return {d: [_render(d, i) for i in range(N_FILMS)] for d in DOMAINS}


def _raster(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Independent rasterisation of an anatomy polygon (cv2, 4 fractional bits)."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def _in_view(polygon: np.ndarray, shape: tuple[int, int], margin: int = 3) -> bool:
    h, w = shape
    return bool(
        polygon.min() >= margin
        and polygon[:, 0].max() < w - margin
        and polygon[:, 1].max() < h - margin
    )


def _best_threshold_accuracy(pos: np.ndarray, neg: np.ndarray) -> float:
    """Accuracy of the best single threshold (either direction) separating pos from neg."""
    x = np.r_[pos, neg]
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))][np.argsort(x, kind="stable")]
    below_pos, below_neg = np.r_[0, np.cumsum(y)], np.r_[0, np.cumsum(1 - y)]
    above_pos = below_pos[-1] - below_pos
    correct = np.maximum(below_neg + above_pos, below_pos + (len(neg) - below_neg))
    return float(correct.max() / len(x))


def test_best_threshold_accuracy_measures_separability() -> None:
    assert _best_threshold_accuracy(np.array([1.0, 2, 3]), np.array([4.0, 5, 6])) == 1.0
    assert _best_threshold_accuracy(np.array([5.0, 6]), np.array([1.0, 2])) == 1.0
    assert _best_threshold_accuracy(np.array([1.0, 4]), np.array([2.0, 3])) == 0.75


# --- the source -------------------------------------------------------------------------


def test_deterministic_and_prefix() -> None:
    small = synthetic_source(n=3, height=96, width=96)
    large = synthetic_source(n=5, height=96, width=96)
    again = synthetic_source(n=3, height=96, width=96)
    for a, b, c in zip(small, large, again, strict=False):
        assert a.id == b.id == c.id
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert np.array_equal(a.image, c.image) and a.spacing == b.spacing


def test_seeds_and_domains_differ() -> None:
    base = synthetic_source(n=2, height=96, width=96)
    other_seed = synthetic_source(n=2, seed=1, height=96, width=96)
    external = synthetic_source(n=2, domain="external", height=96, width=96)
    for a, b, c in zip(base, other_seed, external, strict=True):
        assert not np.array_equal(a.image, b.image) and not np.array_equal(a.label, b.label)
        assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(base[0].image, base[1].image)


def test_samples_follow_the_source_contract() -> None:
    skipped: list = []
    samples = synthetic_source(
        n=2, domain="external", height=160, width=96, on_error="skip", skipped=skipped
    )
    assert [s.id for s in samples] == ["syn-external-0000", "syn-external-0001"]
    for s in samples:
        assert isinstance(s, Sample)
        s.check()
        assert s.patient_id == s.id and s.meta == {"domain": "external"}
        assert s.image.shape == s.label.shape == (160, 96) and s.image.dtype == np.uint8
        assert s.spacing is not None and s.spacing[0] == s.spacing[1] > 0
    assert skipped == []
    assert synthetic_source(n=0) == []


@pytest.mark.parametrize(
    "kwargs", [{"domain": "nope"}, {"n": -1}, {"height": 8}, {"width": 2.5}, {"seed": -3}]
)
def test_bad_arguments_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        synthetic_source(**{"n": 1, **kwargs})
    if "domain" in kwargs:
        assert "valid choices: external, internal" in str(err.value)


# --- labels and geometry ----------------------------------------------------------------


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_labels_are_four_ordered_components(films: dict, domain: str) -> None:
    for _, levels, _ in films[domain]:
        label = vertebra_labels(levels)
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
        rows = []
        for k in range(1, 5):
            _, count = ndimage.label(label == k)
            assert count == 1
            rows.append(np.argwhere(label == k)[:, 0].mean())
        assert rows == sorted(rows)


def test_labels_are_the_rendered_polygons(films: dict) -> None:
    for _, label, anat in films["internal"][:10]:
        expected = np.zeros_like(label)
        # every vertebra carries its level value; Th8..Th11 are drawn last
        order = [n for n in LEVELS if n not in TARGET_LEVELS] + list(TARGET_LEVELS)
        for name in order:
            expected[_raster(anat.vertebra(name).polygon, label.shape)] = LABELS[name]
        assert np.array_equal(label, expected)
        assert LABELS["Th8"] == level_value("Th8") and LABELS["L5"] == level_value("L5")
    # The film shows bone exactly there: brighter inside each body than just outside it.
    for i in range(6):
        image, label, anat = _render("internal", i, ideal=True)
        assert np.array_equal(label, films["internal"][i][1])
        for v in anat.vertebrae:
            if not _in_view(v.polygon, image.shape):
                continue
            inside = _raster(v.polygon, image.shape)
            ring = ndimage.binary_dilation(inside, iterations=2) & ~inside
            assert image[inside].mean() > image[ring].mean(), v.name


def test_vertebrae_never_overlap_and_ribs_stop_at_th12(films: dict) -> None:
    for _, label, anat in films["internal"] + films["external"]:
        count = np.zeros(label.shape, np.int32)
        for v in anat.vertebrae:
            count += _raster(v.polygon, label.shape)
        assert count.max() <= 1
        assert [v.name for v in anat.vertebrae] == list(LEVELS)
        assert [v.name for v in anat.vertebrae if v.has_ribs] == list(RIB_LEVELS)
        rib_names = [name for name, _ in anat.ribs]
        assert sorted(set(rib_names)) == sorted(RIB_LEVELS)
        assert all(rib_names.count(name) == 2 for name in RIB_LEVELS)  # one pair each


# --- no shortcut to Th8..Th11 -----------------------------------------------------------


def test_th8_position_varies(films: dict) -> None:
    for domain in DOMAINS:
        rows = np.array([a.vertebra("Th8").centroid[1] / SIZE for _, _, a in films[domain]])
        assert rows.std() > 0.05 and rows.max() - rows.min() > 0.25


def test_sizes_grow_smoothly_through_the_labelled_levels(films: dict) -> None:
    names = [f"Th{i}" for i in range(3, 13)] + ["L1", "L2"]
    areas = np.array(
        [
            [
                cv2.contourArea(a.vertebra(n).polygon.astype(np.float32)) * a.spacing**2
                for n in names
            ]
            for _, _, a in films["internal"]
        ]
    )
    ratios = areas[:, 1:] / areas[:, :-1]  # ratio of each level to the one above
    assert (ratios > 0.8).all() and (ratios < 1.35).all()
    mean = ratios.mean(axis=0)
    at_edges = [mean[names.index("Th8") - 1], mean[names.index("Th12") - 1]]
    inside = mean[names.index("Th9") - 1 : names.index("Th11")]
    # Entering or leaving the labelled block changes size no differently than elsewhere.
    assert all(mean.min() <= r <= mean.max() for r in at_edges)
    assert inside.min() >= mean.min() and inside.max() <= mean.max()


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_intensity_does_not_single_out_the_labelled_vertebrae(films: dict, domain: str) -> None:
    labelled, neighbours = [], []
    for image, _, anat in films[domain]:
        for v in anat.vertebrae:
            target = v.name in TARGET_LEVELS
            compared = target or v.name in ("Th5", "Th6", "Th7", "Th12")
            if compared and _in_view(v.polygon, image.shape):
                mean = float(image[_raster(v.polygon, image.shape)].mean())
                (labelled if target else neighbours).append(mean)
    chance = max(len(labelled), len(neighbours)) / (len(labelled) + len(neighbours))
    accuracy = _best_threshold_accuracy(np.array(labelled), np.array(neighbours))
    assert accuracy < chance + 0.1


# --- domains ----------------------------------------------------------------------------


def _auc(high: list[float], low: list[float]) -> float:
    """P(a value of `high` exceeds one of `low`): 1 = fully separated, 0.5 = same."""
    h, lo = np.array(high)[:, None], np.array(low)[None, :]
    return float(np.mean(h > lo) + 0.5 * np.mean(h == lo))


def test_domains_differ_in_acquisition(films: dict) -> None:
    def detail(image: np.ndarray) -> float:  # fine-scale energy: sharpness + fine noise
        img = image.astype(np.float32)
        return float(np.median(np.abs(img - cv2.GaussianBlur(img, (0, 0), 1.5))))

    stats = {
        d: {
            "detail": [detail(img) for img, _, _ in films[d]],
            "spacing": [a.spacing for _, _, a in films[d]],
            "brightness": [float(img.mean()) for img, _, _ in films[d]],
        }
        for d in DOMAINS
    }
    internal, external = stats["internal"], stats["external"]
    assert _auc(internal["detail"], external["detail"]) > 0.9
    assert _auc(external["spacing"], internal["spacing"]) > 0.7
    assert _auc(external["brightness"], internal["brightness"]) > 0.6


# --- gallery CLI ------------------------------------------------------------------------


def test_gallery_cli_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "figs" / "gallery.png"
    proc = subprocess.run(
        [sys.executable, "-m", "spineseg.cli.gallery", f"out={out}", "n=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as img:
        assert img.width > 200 and img.height > 200
    assert sorted(p.name for p in out.parent.iterdir()) == ["gallery.png"]  # no temp left


def test_gallery_rejects_bad_n(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from spineseg.cli.gallery import gallery

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("gallery", overrides=["n=0", f"out={tmp_path / 'g.png'}"])
    with pytest.raises(ConfigError):
        gallery(cfg)
    assert not (tmp_path / "g.png").exists()
