"""read_image / read_mask: every supported format decodes to what the pipeline expects, and
every bad file is a DataError that names it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_fixtures import write_dicom
from pydicom.dataset import Dataset

from spineseg.data.io import handle_error, load_parallel, read_image, read_mask
from spineseg.errors import ConfigError, DataError

RAMP16 = (np.arange(12 * 16, dtype=np.uint32).reshape(12, 16) * 300).astype(np.uint16)
RAMP8 = (np.arange(12 * 16).reshape(12, 16) % 256).astype(np.uint8)


def _bad(path: Path, fragment: str, reader=read_image) -> DataError:
    with pytest.raises(DataError) as info:
        reader(path)
    message = str(info.value)
    assert path.name in message, message
    assert fragment.lower() in message.lower(), message
    return info.value


# ----------------------------------------------------------------------------- raster


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("pixels", [RAMP8, RAMP16], ids=["8bit", "16bit"])
def test_lossless_roundtrip_keeps_depth_and_values(tmp_path, ext, pixels):
    path = tmp_path / f"film{ext}"
    assert cv2.imwrite(str(path), pixels)
    image, spacing = read_image(path)
    assert image.dtype == pixels.dtype
    np.testing.assert_array_equal(image, pixels)
    assert spacing is None


def test_jpeg_gray_decodes_as_uint8(tmp_path):
    smooth = np.tile(np.linspace(40, 200, 32, dtype=np.uint8), (24, 1))
    path = tmp_path / "film.jpeg"
    cv2.imwrite(str(path), smooth, [cv2.IMWRITE_JPEG_QUALITY, 95])
    image, _ = read_image(path)
    assert image.shape == smooth.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - smooth).max() <= 3


def test_gray_stored_as_rgb_or_opaque_rgba_is_accepted(tmp_path):
    for name, pixels in {
        "rgb.png": np.dstack([RAMP8] * 3),
        "rgba.png": np.dstack([RAMP8] * 3 + [np.full_like(RAMP8, 255)]),
        "rgb.jpg": np.dstack([np.full((16, 16), 90, np.uint8)] * 3),
    }.items():
        cv2.imwrite(str(tmp_path / name), pixels)
        image, _ = read_image(tmp_path / name)
        assert image.ndim == 2, name
        if name.endswith(".png"):
            np.testing.assert_array_equal(image, RAMP8)


def test_colour_image_is_rejected_with_the_gray_hint(tmp_path):
    colour = np.dstack([RAMP8, RAMP8 // 2, RAMP8]).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "photo.png"), colour)
    err = _bad(tmp_path / "photo.png", "RGB image where grayscale is expected")
    assert "channels are equal" in err.problem


def test_transparent_image_is_rejected(tmp_path):
    rgba = np.dstack([RAMP8] * 3 + [np.full_like(RAMP8, 100)])
    cv2.imwrite(str(tmp_path / "t.png"), rgba)
    _bad(tmp_path / "t.png", "transparency")


def test_float_tiff_is_an_unexpected_bit_depth(tmp_path):
    cv2.imwrite(str(tmp_path / "f.tif"), RAMP16.astype(np.float32))
    _bad(tmp_path / "f.tif", "bit depth")


def test_unsupported_extension_missing_and_empty_files(tmp_path):
    (tmp_path / "film.bmp").write_bytes(b"BM")
    _bad(tmp_path / "film.bmp", "unsupported image extension '.bmp'")
    _bad(tmp_path / "gone.png", "not found")
    (tmp_path / "empty.png").write_bytes(b"")
    _bad(tmp_path / "empty.png", "empty")


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif"])
def test_corrupt_file_is_rejected(tmp_path, ext):
    path = tmp_path / f"corrupt{ext}"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 if ext == ".png" else b"junk" * 99
    )
    with pytest.raises(DataError) as info:
        read_image(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file_is_rejected(tmp_path, ext):
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    path = tmp_path / f"cut{ext}"
    ok, data = cv2.imencode(ext, noisy)
    assert ok
    path.write_bytes(data.tobytes()[: len(data) * 2 // 3])
    _bad(path, "truncated")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_damaged_scan_data_is_rejected(tmp_path, ext):
    """Complete files whose compressed data is damaged: OpenCV would decode the JPEG into a
    partly grey film with a line on stderr; both must be errors naming the file."""
    smooth = cv2.GaussianBlur(
        np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8), (0, 0), 5
    )
    ok, data = cv2.imencode(ext, smooth)
    assert ok
    raw = bytearray(data.tobytes())
    start = raw.rfind(b"\xff\xda") + 600 if ext == ".jpg" else 200
    for i in range(start, start + 400, 7):
        raw[i] = 0xFF if ext == ".jpg" else raw[i] ^ 0x55
    path = tmp_path / f"damaged{ext}"
    path.write_bytes(bytes(raw))
    _bad(path, "damaged JPEG" if ext == ".jpg" else "cannot decode")


def test_intact_jpeg_decodes_like_opencv(tmp_path):
    _, data = cv2.imencode(".jpg", cv2.GaussianBlur(RAMP8, (0, 0), 1))
    path = tmp_path / "ok.jpg"
    path.write_bytes(data.tobytes())
    image, _ = read_image(path)
    np.testing.assert_array_equal(image, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def test_truncated_tiff_is_rejected(tmp_path):
    path = tmp_path / "cut.tif"
    ok, data = cv2.imencode(".tif", RAMP16)
    assert ok
    path.write_bytes(data.tobytes()[: len(data) // 2])
    with pytest.raises(DataError) as info:
        read_image(path)
    assert "cut.tif" in str(info.value)


# ----------------------------------------------------------------------------- masks


def test_read_mask_accepts_8bit_png_and_tif(tmp_path):
    labels = (RAMP8 % 5).astype(np.uint8)
    for ext in (".png", ".tif"):
        cv2.imwrite(str(tmp_path / f"m{ext}"), labels)
        np.testing.assert_array_equal(read_mask(tmp_path / f"m{ext}"), labels)


def test_read_mask_rejects_16bit_rgb_and_jpeg(tmp_path):
    cv2.imwrite(str(tmp_path / "deep.png"), RAMP16)
    _bad(tmp_path / "deep.png", "16-bit mask", read_mask)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([RAMP8, RAMP8 * 0, RAMP8]))
    _bad(tmp_path / "rgb.png", "RGB mask", read_mask)
    cv2.imwrite(str(tmp_path / "lossy.jpg"), RAMP8)
    _bad(tmp_path / "lossy.jpg", "unsupported mask extension", read_mask)


# ----------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_keeps_stored_values_and_spacing(tmp_path):
    pixels = np.array([[0, 1000], [2000, 4095]], np.uint16)
    path = write_dicom(tmp_path / "a.dcm", pixels, PixelSpacing=[0.15, 0.2])
    image, spacing = read_image(path)
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, pixels)
    assert spacing == pytest.approx((0.15, 0.2))


def test_dicom_imager_pixel_spacing_is_the_fallback(tmp_path):
    pixels = np.zeros((4, 4), np.uint16)
    path = write_dicom(tmp_path / "b.dcm", pixels, ImagerPixelSpacing=[0.139, 0.139])
    assert read_image(path)[1] == pytest.approx((0.139, 0.139))
    both = write_dicom(
        tmp_path / "c.dcm", pixels, PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.2, 0.2]
    )
    assert read_image(both)[1] == pytest.approx((0.1, 0.1))


def test_dicom_monochrome1_is_inverted_over_the_stored_range(tmp_path):
    pixels = np.array([[0, 1000], [2000, 4095]], np.uint16)
    image, _ = read_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    np.testing.assert_array_equal(image, 4095 - pixels)


def test_truncated_dicom_pixel_data_is_rejected(tmp_path):
    path = write_dicom(
        tmp_path / "cut.dcm", (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)
    )
    path.write_bytes(path.read_bytes()[:-1000])
    _bad(path, "less than expected")


def test_dicom_8bit_stays_uint8(tmp_path):
    image, _ = read_image(write_dicom(tmp_path / "e.dcm", RAMP8))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, RAMP8)


def test_dicom_window_maps_to_full_uint16(tmp_path):
    pixels = np.array([[0, 999, 1500], [2000, 3001, 4095]], np.uint16)
    path = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=2000, WindowWidth=2000)
    image, _ = read_image(path)
    assert image.dtype == np.uint16
    assert image[0, 0] == image[0, 1] == 0  # below the window
    assert image[1, 1] == image[1, 2] == 65535  # above it
    assert int(image[0, 2]) == pytest.approx(65535 / 4, abs=100)
    assert int(image[1, 0]) == pytest.approx(65535 / 2, abs=100)
    inverted, _ = read_image(
        write_dicom(tmp_path / "w1.dcm", pixels, "MONOCHROME1", WindowCenter=2000, WindowWidth=2000)
    )
    np.testing.assert_array_equal(inverted, 65535 - image)


def test_dicom_rescale_is_applied_before_the_window(tmp_path):
    # Stored 500 -> 2*500 - 1000 = 0 (window centre, mid grey); 0 -> -1000 (below).
    pixels = np.array([[0, 500, 1500]], np.uint16)
    path = write_dicom(
        tmp_path / "r.dcm",
        pixels,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=0,
        WindowWidth=1000,
    )
    image, _ = read_image(path)
    assert image[0, 0] == 0 and image[0, 2] == 65535
    assert int(image[0, 1]) == pytest.approx(32768, abs=100)


def test_dicom_rescale_without_window_maps_the_modality_range(tmp_path):
    pixels = np.array([[0, 2047, 4095]], np.uint16)  # -> -1000, 3094, 7190
    path = write_dicom(tmp_path / "s.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1000)
    image, _ = read_image(path)
    assert image.dtype == np.uint16
    assert image[0, 0] == 0 and image[0, 2] == 65535
    assert int(image[0, 1]) == pytest.approx(65535 * 2047 / 4095, abs=2)


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new("LUTData", "US", (4095 - np.arange(4096)).tolist())  # a reversing LUT
    pixels = np.array([[0, 4095]], np.uint16)
    image, _ = read_image(write_dicom(tmp_path / "v.dcm", pixels, VOILUTSequence=[lut]))
    assert image.tolist() == [[65535, 0]]


def test_extensionless_dicom_is_recognised(tmp_path):
    pixels = np.array([[1, 2], [3, 4]], np.uint16)
    path = write_dicom(tmp_path / "IM0001", pixels)
    np.testing.assert_array_equal(read_image(path)[0], pixels)


def test_bad_dicom_files_name_the_file(tmp_path):
    (tmp_path / "text.dcm").write_bytes(b"hello, not a DICOM file " * 20)
    _bad(tmp_path / "text.dcm", "DICOM")
    _bad(tmp_path / "gone.dcm", "not found")
    good = write_dicom(tmp_path / "full.dcm", RAMP16)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-50])
    _bad(cut, "pixel data")
    rgb = write_dicom(tmp_path / "pal.dcm", RAMP8, "PALETTE COLOR")
    _bad(rgb, "photometric")


# ----------------------------------------------------------------------------- errors


def test_handle_error_raises_or_records():
    err = DataError("x.png", "broken")
    with pytest.raises(DataError):
        handle_error(err, "raise", [])
    skipped: list = []
    handle_error(err, "skip", skipped)
    assert skipped == [("x.png", "broken")]


def test_load_parallel_keeps_order_and_reports_the_first_bad_item():
    def load(i: int) -> int:
        if i % 3 == 0:
            raise DataError(f"f{i}", "bad")
        return i * 10

    skipped: list = []
    assert load_parallel(range(1, 9), load, "skip", skipped, workers=4) == [10, 20, 40, 50, 70, 80]
    assert [p for p, _ in skipped] == ["f3", "f6"]
    with pytest.raises(DataError, match="f3"):
        load_parallel(range(1, 9), load, "raise", None, workers=4)
    with pytest.raises(ConfigError, match="on_error"):
        from spineseg.data.io import check_on_error

        check_on_error("ignore")


@pytest.mark.parametrize(
    ("path", "recorded", "expected"),
    [
        ("/a/runs/r1/jobs/m/best.ckpt", "/a/runs/r1", "/b/r1/jobs/m/best.ckpt"),
        ("/a/runs/r1/jobs/m/best.ckpt", "runs/r1", "/b/r1/jobs/m/best.ckpt"),  # relative root
        ("runs/r1/stage1", "runs/r1", "/b/r1/stage1"),
        ("/elsewhere/stage1", "/a/runs/r1", "/elsewhere/stage1"),  # outside: unchanged
        ("/a/runs/r10/x", "/a/runs/r1", "/a/runs/r10/x"),  # a prefix of a name is not inside
        ("/a/runs/r1/x", None, "/a/runs/r1/x"),
    ],
)
def test_a_path_inside_a_moved_run_directory_follows_it(path, recorded, expected) -> None:
    from spineseg.utils.paths import rebased

    assert rebased(path, recorded, "/b/r1") == Path(expected)
