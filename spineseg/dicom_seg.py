"""Predicted masks as DICOM Segmentation objects (highdicom), so that a PACS viewer or
3D Slicer shows them over the film they came from.

A SEG references its source film by Study, Series and SOP Instance UID and copies the
patient and study modules the standard requires; it is written next to the PNG mask, in the
output folder the user chose, and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spineseg.errors import DataError
from spineseg.names import STORED_TARGET, TARGET_LEVELS
from spineseg.utils.io import atomic_open

#: What the source must carry for a SEG to reference it.
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")
#: Type 2 patient and study attributes (present, possibly empty) that a SEG copies; a film
#: exported without them gets them empty, never invented.
TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip


def _segments(target: str) -> list:
    """One segment for the region, or one per vertebra Th8..Th11, with SNOMED CT codes."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from spineseg import __version__

    algorithm = hd.AlgorithmIdentificationSequence(
        name="spineseg ensemble",
        version=__version__,
        family=codes.DCM.ArtificialIntelligence,
    )
    if target == "region":
        named = [("Th8-Th11", codes.SCT.ThoracicSpine)]
    else:
        vertebra = {"Th8": "T8", "Th9": "T9", "Th10": "T10", "Th11": "T11"}
        named = [(lv, getattr(codes.SCT, f"{vertebra[lv]}Vertebra")) for lv in TARGET_LEVELS]
    return [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, (label, code) in enumerate(named, start=1)
    ]


def write_seg(
    source: str | Path, labels: np.ndarray, target: str, out: str | Path, rule: str
) -> Path:
    """`labels` (the film's grid: 0/1 in region mode, 0..4 = Th8..Th11 otherwise) as a
    binary DICOM SEG at `out`; a DataError naming the source when it cannot be referenced."""
    import highdicom as hd
    import pydicom

    from spineseg import __version__

    source = Path(source)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    missing = [k for k in REQUIRED if not getattr(ds, k, None)]
    if missing:
        raise DataError(source, f"no {', '.join(missing)}: a DICOM SEG cannot reference it")
    for key in TYPE2:
        if key not in ds:
            setattr(ds, key, None)
    if labels.shape != (int(ds.Rows), int(ds.Columns)):
        raise DataError(source, f"mask {labels.shape} is not the film's {ds.Rows}x{ds.Columns}")
    segments = _segments(STORED_TARGET.get(target, target))  # levels models predict the region
    pixels = np.asarray(labels, np.uint8)
    if int(pixels.max(initial=0)) > len(segments):
        raise DataError(source, f"labels up to {int(pixels.max())}, {len(segments)} segment(s)")
    try:
        seg = hd.seg.Segmentation(
            source_images=[ds],
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=hd.UID(),
            series_number=int(getattr(ds, "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="spineseg",
            manufacturer_model_name=f"spineseg {rule} ensemble",
            software_versions=__version__,
            device_serial_number="spineseg",
            series_description=f"Th8-Th11 ({rule} ensemble)",
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError) as err:  # highdicom's checks of the source
        raise DataError(source, f"cannot build a DICOM SEG: {err}") from None
    out = Path(out)
    with atomic_open(out, "wb") as fh:
        seg.save_as(fh)
    return out
