"""`SpineDataModule`: any source as the internal set (split 70/10/20 by patient) and any
source as the external, test-only set; decoded, resized and preprocessed once, cached."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spineseg.data import geometry as G
from spineseg.data import transforms as T
from spineseg.data.cascade import CropSpec, check_stage1_split, crop_all
from spineseg.data.io import to_uint8
from spineseg.data.sample import Sample
from spineseg.data.sources import build_spec
from spineseg.data.splits import (
    check_disjoint,
    read_splits_csv,
    split_by_patient,
    write_splits_csv,
)
from spineseg.errors import ConfigError, DataError, choices_message
from spineseg.labels import check_target, target_masks, vertebra_labels
from spineseg.names import DATA_SPLITS, EXTERNAL, STORED_SPLITS, TEST, VAL
from spineseg.utils.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: level values of every labelled vertebra; 3: AASCE drops out-of-order ones
_MEMORY_CACHE: dict[str, tuple[Prepared, list]] = {}


@dataclass
class Prepared:
    """One source's films at working resolution, preprocessed, ready for any split."""

    ids: list[str]
    patients: list[str]
    forced: list[str | None]
    images: np.ndarray  # uint8 (N,H,W)
    labels: np.ndarray  # uint8 (N,H,W) level values (`spineseg.labels`; 0..1 where binary)
    binary: np.ndarray  # bool (N,): the source only had the region
    spacing: np.ndarray  # float32 (N,2) mm per working pixel, NaN if unknown
    geometry: list[dict] = field(default_factory=list)

    def subset(self, keep: list[int]) -> Prepared:
        idx = np.asarray(keep, dtype=np.int64)
        return Prepared(
            [self.ids[i] for i in keep],
            [self.patients[i] for i in keep],
            [self.forced[i] for i in keep],
            self.images[idx],
            self.labels[idx],
            self.binary[idx],
            self.spacing[idx],
            [self.geometry[i] for i in keep],
        )

    def masks(self, target: str) -> np.ndarray:
        """The exact masks the model learns and metrics use, for `target`."""
        return target_masks(self.labels, self.binary, target, self.ids)

    def vertebrae(self) -> np.ndarray:
        """Th8..Th11 as 1..4 (0 elsewhere, and everywhere on films with a binary mask): what
        the level-error metric measures against, whatever the target."""
        out = vertebra_labels(self.labels)
        out[self.binary] = 0
        return out


def working_film(
    image: np.ndarray,
    label: np.ndarray | None,
    size: tuple[int, int],
    resize: str,
    preprocess: str,
) -> tuple[np.ndarray, np.ndarray | None, G.Geometry]:
    """A film at the working resolution, preprocessed, with its label (nearest neighbour)
    and the geometry back to the original: the one path from a film to what a model sees,
    shared by training and predict."""
    blank = np.zeros(np.shape(image)[:2], np.uint8) if label is None else label
    img, lab, geom = G.to_working(to_uint8(image), blank, size, resize)
    return T.preprocess(img, preprocess), (None if label is None else lab), geom


def prepare(
    samples: list[Sample], image_size: tuple[int, int], resize: str, preprocess: str
) -> Prepared:
    H, W = image_size
    n = len(samples)
    images = np.empty((n, H, W), np.uint8)
    labels = np.empty((n, H, W), np.uint8)
    spacing = np.full((n, 2), np.nan, np.float32)
    geoms = []
    for k, s in enumerate(samples):
        s.check()
        images[k], lab, g = working_film(s.image, s.label, (H, W), resize, preprocess)
        labels[k] = lab
        spacing[k] = G.working_spacing(s.spacing, g)
        geoms.append(g.as_dict())
    return Prepared(
        [s.id for s in samples],
        [s.patient_id for s in samples],
        [s.split for s in samples],
        images,
        labels,
        np.array([s.binary_label for s in samples], bool),
        spacing,
        geoms,
    )


def _fingerprint(root: str | None) -> list:
    """Cheap change detector for a dataset folder: names, sizes and mtimes."""
    if not root or not Path(root).is_dir():
        return []
    out = []
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            out.append(
                (os.path.relpath(os.path.join(dirpath, f), root), st.st_size, st.st_mtime_ns)
            )
    return out


def _cache_key(spec: dict) -> str:
    blob = json.dumps(
        {**spec, "version": CACHE_VERSION, "files": _fingerprint(spec.get("root"))},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _save_prepared(path: Path, p: Prepared, skipped: list) -> None:
    meta = {
        "ids": p.ids,
        "patients": p.patients,
        "forced": p.forced,
        "geometry": p.geometry,
        "skipped": [list(row) for row in skipped],
    }
    with atomic_open(path, "wb") as fh:
        np.savez(
            fh,
            images=p.images,
            labels=p.labels,
            binary=p.binary,
            spacing=p.spacing,
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        )


def _load_prepared(path: Path) -> tuple[Prepared, list] | None:
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            skipped = [tuple(row) for row in meta.get("skipped", [])]
            return Prepared(
                meta["ids"],
                meta["patients"],
                meta["forced"],
                z["images"],
                z["labels"],
                z["binary"],
                z["spacing"],
                meta["geometry"],
            ), skipped
    except Exception as err:  # a corrupt cache is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s (%s)", path, err)
        return None


def _corrections(path: str | None) -> list | None:
    """A cache key's view of `level_corrections`: what it says, not where it is."""
    if not path:
        return None
    from spineseg.data.level_check import read_corrections

    return sorted(read_corrections(path).items())


def load_source(
    spec: dict,
    image_size: tuple[int, int],
    resize: str,
    preprocess: str,
    cache: str = "disk",
    cache_dir: str | None = None,
    on_error: str = "raise",
    skipped: list | None = None,
) -> Prepared:
    """Decode + resize + preprocess a source once per process (memory) and once per
    machine (disk cache keyed by source, its files' names, sizes and mtimes, geometry,
    preprocessing and on_error); the films a build skipped are kept with it and replayed
    into `skipped` on every hit."""
    name = spec.get("source")
    root = spec.get("root")
    if root is not None:
        root = str(Path(root).expanduser().resolve())
    key_spec = {
        "source": name,
        "root": root,
        "split": spec.get("split"),
        "kwargs": dict(spec.get("source_kwargs") or {}),
        "level_corrections": _corrections(spec.get("level_corrections")),
        "size": list(image_size),
        "resize": resize,
        "preprocess": preprocess,
        # a film skipped under on_error=skip must never be missing from a run that raises
        "on_error": on_error,
    }
    key = _cache_key(key_spec)
    cached = _MEMORY_CACHE.get(key)
    path = Path(cache_dir or ".cache/spineseg") / f"{name}-{key}.npz"
    if cached is None and cache == "disk" and path.exists():
        cached = _load_prepared(path)
    if cached is None:
        left_out: list = []
        samples = build_spec({**spec, "root": root}, on_error=on_error, skipped=left_out)
        if not samples:
            raise DataError(root, f"data source {name!r} yielded no films ({key_spec['kwargs']})")
        cached = prepare(samples, image_size, resize, preprocess), left_out
        if cache == "disk":
            _save_prepared(path, *cached)
    _MEMORY_CACHE[key] = cached
    prepared, left_out = cached
    if skipped is not None:  # a cache hit replays what the build skipped, for skipped.csv
        skipped.extend(left_out)
    return prepared


class FilmDataset(Dataset):
    """uint8 films + masks -> normalised float tensors; augmentation on the uint8 arrays."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, ids: list[str], augment=None):
        self.images, self.masks, self.ids, self.augment = images, masks, ids, augment

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.images[i], self.masks[i]
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": T.to_tensor(image)[None],
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).long(),
            "id": self.ids[i],
        }


def resolve_workers(value: int | str) -> int:
    """`auto`: no worker processes on the CPU (the loader is two orders of magnitude faster
    than a CPU training step, and workers would compete for its cores); with CUDA, the CPUs
    this process may use shared among the visible GPUs (DDP runs one process per GPU), at
    most 8, so the loader keeps up with the GPU."""
    if value == "auto":
        if not torch.cuda.is_available():
            return 0
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(8, (cpus or 1) // max(1, torch.cuda.device_count()) - 1))
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0 or str(value).strip() != str(workers):
        raise ConfigError(f"data.num_workers must be auto or a whole number >= 0, got {value!r}")
    return workers


class SpineDataModule(L.LightningDataModule):
    """Internal dataset split by patient (70/10/20 by default); external dataset test-only."""

    def __init__(
        self,
        *,
        source: str,
        root: str | None,
        split: str | None,
        source_kwargs: dict | None,
        level_corrections: str | None,
        external: dict | None,
        target: str,
        image_size: tuple[int, int] | list[int],
        resize: str,
        preprocess: str,
        augment: str,
        fractions: tuple[float, float, float] | list[float],
        split_seed: int,
        batch_size: int,
        num_workers: int | str,
        cache: str,
        cache_dir: str | None,
        on_error: str,
        crop: dict | None,
        run_dir: str | None = None,
    ) -> None:
        """Every option is a key of conf/data/_base.yaml, where its default and meaning are
        (`spineseg.config.build("data", [...])` builds one as a training run would);
        `run_dir` receives skipped.csv and splits.csv."""
        super().__init__()
        check_target(target)
        if resize not in G.RESIZE_MODES:
            raise ConfigError(choices_message("resize mode", resize, list(G.RESIZE_MODES)))
        if on_error not in ("raise", "skip"):
            raise ConfigError(choices_message("on_error", on_error, ["raise", "skip"]))
        if cache not in ("memory", "disk"):
            raise ConfigError(choices_message("cache", cache, ["memory", "disk"]))
        T.build_preprocess(preprocess)
        self.internal_spec = {
            "source": source,
            "root": root,
            "split": split,
            "source_kwargs": dict(source_kwargs or {}),
            "level_corrections": level_corrections,
        }
        self.external_spec = dict(external) if external else None
        self.target = target
        self.image_size = G.check_size(image_size)
        T.build_augment(augment, self.image_size)
        self.resize, self.preprocess, self.augment = resize, preprocess, augment
        self.fractions, self.split_seed = tuple(fractions), split_seed
        self.batch_size, self.num_workers = batch_size, resolve_workers(num_workers)
        self.cache, self.cache_dir, self.on_error = cache, cache_dir, on_error
        self.run_dir = run_dir
        self.crop = CropSpec.from_config(crop)
        self.parts: dict[str, Prepared] = {}
        self.skipped: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ setup
    def _load(self, spec: dict) -> Prepared:
        return load_source(
            spec,
            self.image_size,
            self.resize,
            self.preprocess,
            self.cache,
            self.cache_dir,
            self.on_error,
            self.skipped,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.parts:
            return
        if self.crop is None:
            internal = self._load(self.internal_spec)
            assignment = self._assign(internal)
        else:  # the cascade's stage 2: every film cropped first (data/cascade.py)
            internal, assignment = self._load_cropped()
        for name in DATA_SPLITS:
            keep = [k for k, i in enumerate(internal.ids) if assignment[i] == name]
            if not keep:
                raise DataError(
                    None,
                    f"the {name} split is empty ({len(internal.ids)} films, "
                    f"fractions {list(self.fractions)}); add films or change "
                    "data.fractions",
                )
            self.parts[name] = internal.subset(keep)
        if self.external_spec and self.crop is None:
            self.parts[EXTERNAL] = self._load(self.external_spec)
        elif self.external_spec:
            samples = build_spec(self.external_spec, on_error=self.on_error, skipped=self.skipped)
            cropped = crop_all(
                samples, [EXTERNAL] * len(samples), self.crop, self.run_dir, EXTERNAL
            )
            self.parts[EXTERNAL] = prepare(cropped, self.image_size, self.resize, self.preprocess)
        for name, part in self.parts.items():
            part.masks(self.target)  # fail early: per-vertebra target on binary masks
            log.info("%s: %d films", name, len(part.ids))
        self._write_skipped()

    def _assign(self, internal: Any) -> dict[str, str]:
        """Film id -> train/val/test, by patient (reused from splits.csv on resume)."""
        patients = dict(zip(internal.ids, internal.patients, strict=True))
        if len(set(internal.ids)) != len(internal.ids):
            dup = next(i for i in internal.ids if internal.ids.count(i) > 1)
            raise DataError(None, f"duplicated film id {dup!r} in the internal dataset")
        assignment = self._splits(internal, patients)
        check_disjoint(assignment, patients)
        return assignment

    def _load_cropped(self) -> tuple[Prepared, dict[str, str]]:
        """The internal films split first (by patient, as always), then each cropped: around
        its truth for training, where stage 1 finds the region for the rest."""
        samples = build_spec(self.internal_spec, on_error=self.on_error, skipped=self.skipped)
        if not samples:
            raise DataError(self.internal_spec.get("root"), "the data source yielded no films")
        films = SimpleNamespace(
            ids=[s.id for s in samples],
            patients=[s.patient_id for s in samples],
            forced=[s.split for s in samples],
        )
        assignment = self._assign(films)
        check_stage1_split(self.crop, assignment)
        splits = [assignment[s.id] for s in samples]
        cropped = crop_all(samples, splits, self.crop, self.run_dir)
        return prepare(cropped, self.image_size, self.resize, self.preprocess), assignment

    def _splits(self, internal: Any, patients: dict[str, str]) -> dict[str, str]:
        path = Path(self.run_dir) / "splits.csv" if self.run_dir else None
        if path is not None and path.exists():
            saved = read_splits_csv(path)
            if set(saved) == set(internal.ids):
                log.info("reusing splits from %s", path)
                return saved
            raise DataError(
                path,
                "splits.csv does not match the dataset's film ids; it "
                "belongs to another dataset (use a new run name)",
            )
        assignment = split_by_patient(
            internal.ids, internal.patients, self.fractions, self.split_seed, internal.forced
        )
        if path is not None:
            write_splits_csv(path, assignment, patients)
        return assignment

    def _write_skipped(self) -> None:
        if not self.skipped:
            return
        log.warning("%d files were skipped (on_error=skip)", len(self.skipped))
        if self.run_dir:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["path", "problem"])
            w.writerows(self.skipped)
            atomic_write_text(Path(self.run_dir) / "skipped.csv", buf.getvalue())

    # ------------------------------------------------------------------ loaders
    @property
    def split_names(self) -> list[str]:
        """Splits that are predicted and stored: val, test and (when set) external."""
        return [s for s in STORED_SPLITS if s in self.parts]

    def dataset(self, split: str, augment: bool = False) -> FilmDataset:
        if split not in self.parts:
            raise ConfigError(choices_message("split", split, list(self.parts)))
        part = self.parts[split]
        # seeded from torch's seed, which seed_everything(cfg.seed) set for this run
        aug = (
            T.build_augment(self.augment, self.image_size, torch.initial_seed() % 2**32)
            if augment
            else None
        )
        return FilmDataset(part.images, part.masks(self.target), part.ids, aug)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        return DataLoader(
            self.dataset(split, augment=train),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(self.parts[split].ids) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL)

    def test_dataloader(self) -> list[DataLoader]:
        """Index 0 = internal test split, 1 = external set (when configured)."""
        return [self._loader(s) for s in (TEST, EXTERNAL) if s in self.parts]

    def predict_dataloader(self) -> list[DataLoader]:
        return [self._loader(s) for s in self.split_names]
