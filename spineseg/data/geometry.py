"""Working-resolution geometry: plain resize (the paper's 256x256) or aspect-preserving
letterbox (spine films are ~1:3), and the inverse map back to the original film."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from spineseg.errors import ConfigError, choices_message

RESIZE_MODES = ("stretch", "letterbox")


@dataclass(frozen=True)
class Geometry:
    """How a film of `orig` size was placed into the working canvas."""

    orig_h: int
    orig_w: int
    out_h: int
    out_w: int
    scale_y: float  # working px per original px
    scale_x: float
    pad_top: int = 0
    pad_left: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def inner(self) -> tuple[int, int]:
        """Size of the resized film inside the canvas (excluding padding)."""
        return round(self.orig_h * self.scale_y), round(self.orig_w * self.scale_x)


def check_size(size: tuple[int, int] | list[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) <= 0 or int(s) % 32 for s in size):
        raise ConfigError(
            f"image_size {list(size)} is invalid: height and width must be positive multiples "
            "of 32 (the encoders downsample 5 times), e.g. [256, 256] or [512, 256]"
        )
    return int(size[0]), int(size[1])


def plan(orig_hw: tuple[int, int], size: tuple[int, int], mode: str) -> Geometry:
    h, w = orig_hw
    H, W = size
    if mode == "stretch":
        return Geometry(h, w, H, W, H / h, W / w)
    if mode == "letterbox":
        s = min(H / h, W / w)
        ih, iw = max(1, round(h * s)), max(1, round(w * s))
        return Geometry(h, w, H, W, s, s, (H - ih) // 2, (W - iw) // 2)
    raise ConfigError(choices_message("resize mode", mode, list(RESIZE_MODES)))


def _place(array: np.ndarray, g: Geometry, interpolation: int) -> np.ndarray:
    ih, iw = g.inner
    resized = cv2.resize(array, (iw, ih), interpolation=interpolation)
    if (ih, iw) == (g.out_h, g.out_w):
        return resized
    canvas = np.zeros((g.out_h, g.out_w), dtype=array.dtype)
    canvas[g.pad_top : g.pad_top + ih, g.pad_left : g.pad_left + iw] = resized
    return canvas


def to_working(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], mode: str
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Image with area interpolation; labels with nearest neighbour, as the study did."""
    g = plan(image.shape[:2], size, mode)
    shrink = g.scale_y < 1 or g.scale_x < 1
    img = _place(image, g, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    lab = _place(label, g, cv2.INTER_NEAREST)
    return img, lab, g


def to_original(array: np.ndarray, g: Geometry, nearest: bool = False) -> np.ndarray:
    """Map a working-resolution map (H,W) or (C,H,W) back onto the original film."""
    if array.ndim == 3:
        return np.stack([to_original(a, g, nearest) for a in array])
    ih, iw = g.inner
    crop = array[g.pad_top : g.pad_top + ih, g.pad_left : g.pad_left + iw]
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    src = crop if crop.dtype != np.float16 else crop.astype(np.float32)
    return cv2.resize(src, (g.orig_w, g.orig_h), interpolation=interp)


def working_spacing(spacing: tuple[float, float] | None, g: Geometry) -> tuple[float, float]:
    """mm per working pixel, NaN when the film's spacing is unknown."""
    if spacing is None:
        return (float("nan"), float("nan"))
    return (spacing[0] / g.scale_y, spacing[1] / g.scale_x)
