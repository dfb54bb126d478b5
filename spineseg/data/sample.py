"""The one record every data source yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spineseg.errors import DataError
from spineseg.names import LEVELS


@dataclass
class Sample:
    """One film and its labels, at the source's original resolution.

    image: HxW grayscale, uint8 or uint16 (already inverted for MONOCHROME1 DICOM).
    label: HxW uint8 level values (`spineseg.labels`): 0 = background, v = LEVELS[v - 1],
           every vertebra the source labels (Th8 is 15). A source whose masks are binary
           (region only) uses 1 for the region and sets `binary_label=True`.
    spacing: (row, col) pixel spacing in mm when known, for distances in mm.
    """

    id: str
    patient_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float] | None = None
    binary_label: bool = False
    source_path: str | None = None
    split: str | None = None  # a split forced by the source (e.g. a folder manifest.csv)
    meta: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise DataError naming the file if image/label are not what the pipeline expects."""
        where = self.source_path or self.id
        if self.image.ndim != 2:
            raise DataError(where, f"image must be 2-D grayscale, got shape {self.image.shape}")
        if self.image.dtype not in (np.uint8, np.uint16):
            raise DataError(where, f"image must be uint8 or uint16, got {self.image.dtype}")
        if self.label.shape != self.image.shape:
            raise DataError(
                where, f"mask size {self.label.shape} differs from image size {self.image.shape}"
            )
        if self.label.dtype != np.uint8:
            raise DataError(where, f"mask must be uint8, got {self.label.dtype}")
        top = 1 if self.binary_label else len(LEVELS)
        if self.label.size and int(self.label.max()) > top:
            bad = sorted(set(np.unique(self.label).tolist()) - set(range(top + 1)))
            raise DataError(where, f"label values {bad} outside the expected set 0..{top}")
