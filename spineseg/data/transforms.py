"""Preprocessing (the group's earlier study) and augmentation presets, as albumentations
pipelines on uint8 working-resolution films.

Preprocessing is deterministic and runs once, after resizing to the working resolution
(so kernel sizes mean the same on every dataset), identically at train, test and predict
time; its output is cached with the decoded films. Augmentation runs online, train only.
"""

from __future__ import annotations

from functools import partial

import albumentations as A
import cv2
import numpy as np
import torch

from spineseg.errors import ConfigError, choices_message

# Gray normalisation = the mean of ImageNet's RGB statistics, which makes a gray image
# through an RGB-summed first convolution equivalent to a replicated-gray RGB image.
GRAY_MEAN = float(np.mean([0.485, 0.456, 0.406]))
GRAY_STD = float(np.mean([0.229, 0.224, 0.225]))


def to_tensor(film: np.ndarray) -> torch.Tensor:
    """uint8 working-resolution film(s) (..., H, W) -> the normalised float tensor every
    model sees: in training, evaluation, predict and the ONNX check alike."""
    x = torch.from_numpy(np.ascontiguousarray(film)).float().div_(255.0)
    return (x - GRAY_MEAN) / GRAY_STD


def _log_transform(image: np.ndarray, **_: object) -> np.ndarray:
    """s = c * log(1 + r), c chosen so the brightest pixel stays the brightest value."""
    img = image.astype(np.float32)
    peak = float(img.max())
    if peak <= 0:
        return image
    out = 255.0 * np.log1p(img) / np.log1p(peak)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _bilateral(image: np.ndarray, **_: object) -> np.ndarray:
    return cv2.bilateralFilter(image, d=9, sigmaColor=50, sigmaSpace=5)


PREPROCESS: dict[str, list] = {
    "none": [],
    "hist_eq": [A.Equalize(mode="cv", p=1.0)],
    "clahe": [A.CLAHE(clip_limit=(2.0, 2.0), tile_grid_size=(8, 8), p=1.0)],
    "log": [A.Lambda(image=_log_transform, name="log_transform", p=1.0)],
    "median": [A.MedianBlur(blur_limit=(5, 5), p=1.0)],
    "gaussian": [A.GaussianBlur(blur_limit=(5, 5), sigma_limit=(1.0, 1.0), p=1.0)],
    "bilateral": [A.Lambda(image=_bilateral, name="bilateral", p=1.0)],
}


def build_preprocess(name: str) -> A.Compose:
    if name not in PREPROCESS:
        raise ConfigError(choices_message("preprocessing", name, list(PREPROCESS)))
    return A.Compose(PREPROCESS[name])


def preprocess(image: np.ndarray, name: str) -> np.ndarray:
    if name == "none":
        return image
    return build_preprocess(name)(image=image)["image"]


def _light() -> list:
    return [
        A.HorizontalFlip(p=0.5),  # AP films: a mirrored scoliosis is still a spine
        A.Affine(
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            rotate=(-10, 10),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=0.7,
        ),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    ]


def _strong() -> list:
    # No vertical flip: Th8..Th11 are found by counting from the top.
    return [
        *_light(),
        A.RandomGamma(gamma_limit=(70, 150), p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))], p=0.3),
        A.GaussNoise(std_range=(0.02, 0.08), p=0.4),
        A.ElasticTransform(alpha=20, sigma=6, border_mode=cv2.BORDER_CONSTANT, p=0.2),
        A.CoarseDropout(
            num_holes_range=(1, 4),
            hole_height_range=(0.03, 0.08),
            hole_width_range=(0.03, 0.08),
            fill=0,
            fill_mask=None,
            p=0.3,
        ),
    ]


#: The most of the film's height `reframe` cuts from its top, and from its bottom.
REFRAME_CUT = 0.2
#: How often each reframing preset cuts a film: `reframe` mostly, `reframe_mild` now and
#: then, so that most training films keep their dataset's framing.
REFRAME_P = {"reframe": 0.7, "reframe_mild": 0.3}


def _reframe(size: tuple[int, int], p: float) -> list:
    """`light`, then (with probability `p`) the film cut at its top and bottom by up to
    REFRAME_CUT of its height each, and put back at a random height on a black canvas of
    the working size.

    Films of one dataset are framed alike (AASCE from just above T1 to the sacrum), so a
    network can find Th8..Th11 by its height on the film instead of by its anatomy, and
    then misses the level on every film framed differently. Cutting into the film moves
    where the spine starts and where the film's edge is, so the height alone no longer tells.
    """
    return [
        *_light(),
        A.RandomCropFromBorders(
            crop_left=0, crop_right=0, crop_top=REFRAME_CUT, crop_bottom=REFRAME_CUT, p=p
        ),
        A.PadIfNeeded(
            *size, position="random", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0
        ),
    ]


#: Presets by name; each takes the working (H, W).
AUGMENT = {
    "none": lambda size: [],
    "light": lambda size: _light(),
    "strong": lambda size: _strong(),
    **{name: partial(_reframe, p=p) for name, p in REFRAME_P.items()},
}


def build_augment(name: str, size: tuple[int, int], seed: int | None = None) -> A.Compose:
    """albumentations 2.x draws from its own RNG, which `seed_everything` does not reach:
    without `seed` two runs of the same config would see different augmentations."""
    if name not in AUGMENT:
        raise ConfigError(choices_message("augmentation preset", name, list(AUGMENT)))
    return A.Compose(AUGMENT[name](tuple(int(v) for v in size)), seed=seed)
