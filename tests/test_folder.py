"""`folder` source: pairing, label modes, manifest.csv, and one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_fixtures import write_dicom

from spineseg.data.folder import folder_source
from spineseg.data.sources import build_source
from spineseg.errors import ConfigError, DataError
from spineseg.labels import level_value, level_values, vertebra_labels
from spineseg.names import LEVELS, TARGET_LEVELS

H, W = 24, 16


def film(seed: int = 0, dtype=np.uint8) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 4095
    return np.random.default_rng(seed).integers(0, top, (H, W)).astype(dtype)


def vertebrae_mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    for value in range(1, 5):
        mask[value * 4 : value * 4 + 3, 4:12] = value
    return mask


def region_mask(on: int = 1) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[4:20, 4:12] = on
    return mask


def write(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Four good films: 8-bit PNG + binary 0/255, 16-bit TIFF + 0/1, JPEG + 1..4, DICOM."""
    write(tmp_path / "images/a.png", film(0))
    write(tmp_path / "masks/a.png", region_mask(255))
    write(tmp_path / "images/b.tif", film(1, np.uint16))
    write(tmp_path / "masks/b.tif", region_mask(1))
    write(tmp_path / "images/c.jpg", film(2))
    write(tmp_path / "masks/c.png", vertebrae_mask())
    write_dicom(
        tmp_path / "images/d.dcm", film(3, np.uint16), "MONOCHROME1", PixelSpacing=[0.2, 0.3]
    )
    write(tmp_path / "masks/d.png", vertebrae_mask())
    return tmp_path


def load(root: Path, **kwargs):
    return {s.id: s for s in folder_source(root=root, **kwargs)}


def expect_error(root: Path, culprit: str, fragment: str, **kwargs) -> DataError:
    """on_error=raise names the culprit; on_error=skip records it and keeps the others."""
    with pytest.raises(DataError) as info:
        folder_source(root=root, **kwargs)
    message = str(info.value)
    assert culprit in message and fragment.lower() in message.lower(), message
    skipped: list = []
    kept = folder_source(root=root, on_error="skip", skipped=skipped, **kwargs)
    assert any(culprit in path and fragment.lower() in p.lower() for path, p in skipped), skipped
    assert kept and Path(culprit).stem not in {s.id for s in kept}  # the good films still load
    return info.value


def test_good_folder_loads_every_format_and_label_kind(dataset):
    samples = load(dataset)
    assert sorted(samples) == ["a", "b", "c", "d"]
    a, b, c, d = (samples[k] for k in "abcd")
    assert a.binary_label and b.binary_label and not c.binary_label and not d.binary_label
    np.testing.assert_array_equal(a.label, region_mask(1))
    np.testing.assert_array_equal(b.label, region_mask(1))
    np.testing.assert_array_equal(vertebra_labels(c.label), vertebrae_mask())
    assert set(np.unique(c.label).tolist()) == {0, *level_values(list(TARGET_LEVELS)).tolist()}
    assert b.image.dtype == np.uint16 and a.image.dtype == np.uint8
    np.testing.assert_array_equal(d.image, 4095 - film(3, np.uint16))  # MONOCHROME1
    assert d.spacing == pytest.approx((0.2, 0.3)) and a.spacing is None
    for sample in samples.values():
        assert sample.patient_id == sample.id and sample.split is None
        assert sample.source_path.endswith(Path(sample.source_path).name)
        assert sample.meta["mask_path"].startswith(str(dataset / "masks"))
        sample.check()


def test_registry_builds_the_folder_source(dataset):
    assert len(build_source("folder", root=str(dataset))) == 4


def test_label_mode_forces_the_interpretation(dataset):
    binary = load(dataset, label_mode="binary", on_error="skip", skipped=[])
    assert set(binary) == {"a", "b"}  # c, d hold 1..4: not binary
    vertebrae = load(dataset, label_mode="vertebrae", on_error="skip", skipped=[])
    assert set(vertebrae) == {"b", "c", "d"}  # a holds 255
    assert not vertebrae["b"].binary_label
    expect_error(dataset, "masks/a.png", "outside the expected set", label_mode="vertebrae")


def test_manifest_sets_ids_patients_and_forced_splits(dataset):
    (dataset / "manifest.csv").write_text(
        "id,image,mask,patient_id,split\n"
        "p1-a,images/a.png,masks/a.png,P1,train\n"
        "p1-b,images/b.tif,masks/b.tif,P1,\n"
        "c,images/c.jpg,masks/c.png,,test\n"
    )
    samples = load(dataset)
    assert sorted(samples) == ["c", "p1-a", "p1-b"]  # d is not listed
    assert samples["p1-a"].patient_id == samples["p1-b"].patient_id == "P1"
    assert samples["c"].patient_id == "c"
    assert [samples[k].split for k in ("p1-a", "p1-b", "c")] == ["train", None, "test"]


def test_manifest_split_column_is_optional(dataset):
    (dataset / "manifest.csv").write_text("id,image,mask\nx,images/a.png,masks/a.png\n")
    (sample,) = folder_source(root=dataset)
    assert (sample.id, sample.patient_id, sample.split) == ("x", "x", None)


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        ("id,image,mask,split\nx,images/a.png,masks/a.png,holdout\n", "line 2: unknown split"),
        ("id,image,mask\nx,images/a.png,masks/a.png\nx,images/b.tif,masks/b.tif\n", "duplicate id"),
        ("id,image\nx,images/a.png\n", "lacks column(s) mask"),
        ("id,image,mask\nx,images/a.png,\n", "missing mask"),
    ],
)
def test_bad_manifest_names_the_manifest(dataset, rows, fragment):
    (dataset / "manifest.csv").write_text(rows)
    with pytest.raises(DataError) as info:
        folder_source(root=dataset)
    assert "manifest.csv" in str(info.value) and fragment in str(info.value)
    skipped: list = []
    kept = folder_source(root=dataset, on_error="skip", skipped=skipped)
    assert skipped and all("manifest.csv" in path for path, _ in skipped)
    if "duplicate" in fragment:
        assert kept == [] and len(skipped) == 2  # both rows: which one is right is unknown


def test_corrupt_and_truncated_images(dataset):
    (dataset / "images/a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200 + b"IEND")
    expect_error(dataset, "images/a.png", "cannot decode")
    data = (dataset / "images/c.jpg").read_bytes()
    (dataset / "images/c.jpg").write_bytes(data[: len(data) // 2])
    (dataset / "images/a.png").unlink()
    (dataset / "masks/a.png").unlink()
    expect_error(dataset, "images/c.jpg", "truncated")


def test_missing_mask(dataset):
    (dataset / "masks/c.png").unlink()
    expect_error(dataset, "images/c.jpg", "missing mask")


def test_mask_without_image(dataset):
    write(dataset / "masks/zzz.png", region_mask())
    expect_error(dataset, "masks/zzz.png", "no matching image")


def test_masks_named_with_a_suffix_are_named_in_both_errors(dataset):
    """`<id>_mask.png` (a common public naming) is not guessed at, but both the image's and
    the mask's error say which file belongs to which, and how to pair them."""
    (dataset / "masks/c.png").rename(dataset / "masks/c_mask.png")
    err = expect_error(dataset, "images/c.jpg", "missing mask")
    how = "a mask takes its image's name, masks/<id>.png, or manifest.csv pairs them"
    assert err.problem.endswith(f"(c_mask.png? {how})")
    skipped: list = []
    folder_source(root=dataset, on_error="skip", skipped=skipped)
    (problem,) = [p for path, p in skipped if path.endswith("masks/c_mask.png")]
    assert problem.endswith(f"no matching image images/c_mask.* (the mask of c.jpg? {how})")


def test_mask_size_differs_from_image(dataset):
    write(dataset / "masks/c.png", np.ones((H + 1, W), np.uint8))
    err = expect_error(dataset, "masks/c.png", "differs from image size")
    assert "c.jpg" in err.problem


def test_label_values_outside_the_expected_set(dataset):
    mask = vertebrae_mask()
    mask[0, 0] = 7
    write(dataset / "masks/c.png", mask)
    expect_error(dataset, "masks/c.png", "label values [0, 1, 2, 3, 4, 7]")
    mixed = region_mask(255)
    mixed[0, 0] = 1
    write(dataset / "masks/c.png", mixed)
    expect_error(dataset, "masks/c.png", "outside the expected set")


def test_declared_levels_map_mask_values_to_vertebrae(dataset):
    """A dataset labelling T1..L5 as 1..17 declares them; the values become those levels,
    and a value beyond the declared ones is refused naming the file and the set."""
    spine = [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
    full = np.zeros((H, W), np.uint8)
    for value in range(1, 18):
        full[value, 2:14] = value
    write(dataset / "masks/c.png", full)
    c = load(dataset, levels=spine)["c"]
    assert c.label[1, 2] == level_value("Th1") and c.label[17, 2] == level_value("L5")
    assert c.label[8, 2] == level_value("Th8") and LEVELS[c.label[11, 2] - 1] == "Th11"
    np.testing.assert_array_equal(vertebra_labels(c.label)[8:12, 2], [1, 2, 3, 4])
    full[0, 0] = 18
    write(dataset / "masks/c.png", full)
    err = expect_error(dataset, "masks/c.png", "0..17", levels=spine)
    assert "the 17 declared levels" in err.problem
    with pytest.raises(ConfigError, match="must include Th8"):
        folder_source(root=dataset, levels=["L1", "L2"])
    with pytest.raises(ConfigError, match="ordered top to bottom"):
        folder_source(root=dataset, levels=["Th11", "Th10", "Th9", "Th8"])
    with pytest.raises(ConfigError, match="unknown vertebra level 'X9'"):
        folder_source(root=dataset, levels=["X9"])


def test_empty_mask(dataset):
    write(dataset / "masks/b.tif", np.zeros((H, W), np.uint8))
    expect_error(dataset, "masks/b.tif", "empty mask")


def test_rgb_image_and_16bit_mask(dataset):
    write(dataset / "images/a.png", np.dstack([film(0), film(1), film(2)]))
    expect_error(dataset, "images/a.png", "RGB image")
    write(dataset / "images/a.png", film(0))
    write(dataset / "masks/c.png", vertebrae_mask().astype(np.uint16))
    expect_error(dataset, "masks/c.png", "16-bit mask")


def test_duplicate_ids_report_every_file(dataset):
    write(dataset / "images/a.jpg", film(5))
    with pytest.raises(DataError, match=r"duplicate id 'a': a\.jpg, a\.png"):
        folder_source(root=dataset)
    skipped: list = []
    kept = folder_source(root=dataset, on_error="skip", skipped=skipped)
    assert sorted(Path(p).name for p, _ in skipped) == ["a.jpg", "a.png", "a.png"]
    assert "a" not in {s.id for s in kept}  # the mask is then an orphan, reported too


def test_unsupported_file_in_images(dataset):
    (dataset / "images/notes.txt").write_text("hello")
    (dataset / "images/.DS_Store").write_bytes(b"\0")  # hidden files are not data
    expect_error(dataset, "images/notes.txt", "unsupported extension")


def test_bad_root_and_options(tmp_path, dataset):
    with pytest.raises(DataError, match="data folder not found"):
        folder_source(root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="images"):
        folder_source(root=tmp_path / "empty")
    with pytest.raises(ConfigError, match="valid choices: auto, binary, vertebrae"):
        folder_source(root=dataset, label_mode="multi")
    with pytest.raises(ConfigError, match="no split of its own"):
        folder_source(root=dataset, split="train")
    with pytest.raises(ConfigError, match="valid choices: raise, skip"):
        folder_source(root=dataset, on_error="ignore")
