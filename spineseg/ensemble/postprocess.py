"""Anatomical post-processing of fused label maps, by name.

`spine` keeps what lies along the spine and fills holes: the largest connected piece of the
prediction (the Th8..Th11 column) and every piece that overlaps its columns and starts within
a disc's gap of it (bodies separated by discs chain up), then fills enclosed holes. Stray
blobs elsewhere on the film, which raise HD95 most, are dropped. On vertebra labels (1..4)
each class keeps its largest body, and the four bodies are relabelled Th8..Th11 from top to
bottom, so the output always names them in anatomical order.

Which post-processing a rule uses is chosen on validation (`choose`), never on test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from spineseg.errors import ConfigError, choices_message

__all__ = ["POSTPROCESS", "apply", "check_names", "spine"]

_EIGHT = np.ones((3, 3), bool)
#: The region spans four vertebrae: a gap of up to a quarter of its height is a disc (or
#: half a body's height while the kept part is a single body).
_GAP_OF_REGION = 0.25


def _keep_along_spine(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece, grown by every piece that overlaps the kept columns and
    starts within a disc's gap of the kept rows (repeated, so separate bodies chain)."""
    parts, n = ndimage.label(mask, structure=_EIGHT)
    if n <= 1:
        return ndimage.binary_fill_holes(mask)
    sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
    boxes = [(r.start, r.stop, c.start, c.stop) for r, c in ndimage.find_objects(parts)]
    main = int(np.argmax(sizes))
    keep = np.zeros(n + 1, bool)
    keep[main + 1] = True
    top, bottom, left, right = boxes[main]
    body = bottom - top  # one vertebra if the bodies are apart, the region if merged
    grown = True
    while grown:
        grown = False
        gap = max(_GAP_OF_REGION * (bottom - top), 0.5 * body)
        for j, (r0, r1, c0, c1) in enumerate(boxes):
            if keep[j + 1] or c0 >= right or left >= c1:
                continue
            if max(r0 - bottom, top - r1, 0) <= gap:
                keep[j + 1] = grown = True
                top, bottom, left, right = (
                    min(top, r0),
                    max(bottom, r1),
                    min(left, c0),
                    max(right, c1),
                )
    return ndimage.binary_fill_holes(keep[parts])


def _ordered_bodies(labels: np.ndarray) -> np.ndarray:
    """Each class's largest body (holes filled), then relabelled 1..4 top to bottom."""
    out = np.zeros_like(labels)
    bodies = []
    for value in range(1, int(labels.max()) + 1):
        parts, n = ndimage.label(labels == value, structure=_EIGHT)
        if not n:
            continue
        sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
        body = ndimage.binary_fill_holes(parts == int(np.argmax(sizes)) + 1)
        bodies.append((float(np.nonzero(body)[0].mean()), body))
    for value, (_, body) in enumerate(sorted(bodies, key=lambda b: b[0]), start=1):
        out[body & (out == 0)] = value
    return out


def spine(labels: np.ndarray) -> np.ndarray:
    """One (H, W) label map: binary region or vertebra classes (see the module docstring)."""
    if not labels.any():
        return labels
    if int(labels.max()) <= 1:
        return _keep_along_spine(labels > 0).astype(labels.dtype)
    return _ordered_bodies(labels)


POSTPROCESS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {"none": None, "spine": spine}


def check_names(names: list[str]) -> list[str]:
    for name in names:
        if name not in POSTPROCESS:
            raise ConfigError(choices_message("post-processing", name, list(POSTPROCESS)))
    return list(names)


def apply(name: str, labels: np.ndarray) -> np.ndarray:
    """Post-process (n, H, W) or (H, W) labels; `none` returns them unchanged."""
    check_names([name])
    fn = POSTPROCESS[name]
    if fn is None:
        return labels
    if labels.ndim == 2:
        return fn(labels)
    return np.stack([fn(x) for x in labels]) if len(labels) else labels
