"""Review sheets for the level check: what an expert reads to say which film's labels are off.

The level check (`spineseg.data.level_check`) can say that a patient's films disagree on the
level, and with three or more films which one is off, but not whether the majority is right:
that takes a reader who counts from the first rib or the sacrum. `write_review` gives that
reader one PNG per patient whose films disagree, the films side by side, each cut to its
labelled column, every labelled body outlined and named as its labels name it (Th8..Th11 in
colour), the check's verdict above each film; and `review.csv`, one row per film of those
patients with an empty `expert_offset` column for the reader's answer, in the check's own
convention (how many levels lower the film's labels sit than the anatomy: +1 when the body
labelled Th8 is Th9).

    spineseg-validate-data data=aasce data.root=... review=level_review/
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from spineseg.data.io import to_uint8, write_png
from spineseg.data.level_check import FilmCheck, LevelCheck, patient_groups, verdict
from spineseg.data.sample import Sample
from spineseg.names import LEVELS, TARGET_VALUES
from spineseg.utils.io import atomic_open

PANEL_HEIGHT = 900  # every film's column is shown this many pixels tall
NAMES_WIDTH = 64  # a strip left of each film for the bodies' names
LINE = 19  # pixels per line of text
TITLE_HEIGHT = 5 * LINE + 6  # above each film: its file, then the check's verdict (4 lines)
MIN_WIDTH = 280  # a narrow column still gets room for its verdict
GAP = 12
FONT, SCALE, NAME_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0.55
#: BGR outlines of Th8..Th11 (as the gallery colours them); other bodies are grey.
TARGET_COLOURS = ((50, 50, 230), (80, 200, 50), (255, 120, 60), (40, 210, 250))
OTHER_COLOUR = (170, 170, 170)
REVIEW_COLUMNS = ("patient", "id", "file", "offset", "agrees", "verdict", "sheet", "expert_offset")


def column_box(label: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the labelled bodies, grown by a tenth of the column's
    height above and below and by half its width on either side, inside the film."""
    rows, cols = np.nonzero(label)
    if not len(rows):
        return 0, label.shape[0], 0, label.shape[1]
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    dy, dx = (bottom - top) // 10, (right - left) // 2
    h, w = label.shape
    return max(0, top - dy), min(h, bottom + dy), max(0, left - dx), min(w, right + dx)


def panel(sample: Sample, title: str, caption: str) -> np.ndarray:
    """One film's column, PANEL_HEIGHT tall, its bodies outlined and named, with a title."""
    top, bottom, left, right = column_box(sample.label)
    image = to_uint8(sample.image[top:bottom, left:right])
    label = sample.label[top:bottom, left:right]
    scale = PANEL_HEIGHT / max(1, image.shape[0])
    size = (max(1, round(image.shape[1] * scale)), PANEL_HEIGHT)
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    film = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    names = np.zeros((PANEL_HEIGHT, NAMES_WIDTH, 3), np.uint8)
    targets = [int(v) for v in TARGET_VALUES]
    for value in (int(v) for v in np.unique(label) if v > 0):
        body = (label == value).astype(np.uint8)
        colour = TARGET_COLOURS[targets.index(value)] if value in targets else OTHER_COLOUR
        contours, _ = cv2.findContours(body, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(film, contours, -1, colour, 2)
        y = int(np.nonzero(body)[0].mean())
        cv2.putText(names, LEVELS[value - 1], (4, y + 5), FONT, NAME_SCALE, colour, 1,
                    cv2.LINE_AA)  # fmt: skip
    body = np.hstack([names, film])
    width = max(body.shape[1], MIN_WIDTH)
    canvas = np.zeros((TITLE_HEIGHT + PANEL_HEIGHT, width, 3), np.uint8)
    canvas[TITLE_HEIGHT:, : body.shape[1]] = body
    lines = [title, *_wrapped(caption, width - 8)][: TITLE_HEIGHT // LINE]
    for i, text in enumerate(lines):
        cv2.putText(canvas, text, (4, LINE * (i + 1)), FONT, SCALE, (255, 255, 255), 1,
                    cv2.LINE_AA)  # fmt: skip
    return canvas


def _wrapped(text: str, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(joined, FONT, SCALE, 1)[0][0] <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    return lines


def patient_sheet(samples: Sequence[Sample], films: Mapping[str, FilmCheck]) -> np.ndarray:
    """A patient's films side by side, in id order, each under its verdict."""
    panels = []
    for s in samples:
        f = films[s.id]
        shift = f" (offset {f.offset:+d})" if f.settled and f.offset else ""
        name = Path(s.source_path).name if s.source_path else s.id
        panels.append(panel(s, f"{name}{shift}", verdict(f)))
    gap = np.zeros((TITLE_HEIGHT + PANEL_HEIGHT, GAP, 3), np.uint8)
    return np.hstack([part for p in panels for part in (p, gap)][:-1])


def _sheet_name(patient: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", patient) + ".png"


def write_review(samples: Sequence[Sample], check: LevelCheck, folder: str | Path) -> int:
    """A sheet per patient with a film whose labels do not agree, and `review.csv`; returns
    the number of sheets."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for patient, group in sorted(patient_groups(samples).items()):
        if all(check.films[s.id].agrees for s in group):
            continue
        sheet = _sheet_name(patient)
        write_png(folder / sheet, patient_sheet(group, check.films))
        for s in group:
            f = check.films[s.id]
            rows.append([patient, s.id, s.source_path or "", f.offset, int(f.agrees),
                         verdict(f), sheet, ""])  # fmt: skip
    with atomic_open(folder / "review.csv", "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(REVIEW_COLUMNS)
        writer.writerows(rows)
    return len({r[0] for r in rows})
