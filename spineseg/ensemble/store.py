"""The prediction store: every model's probabilities and the ground truth, one npz per split.

Training writes it, the ensemble engine only reads it, so ensembling never re-runs a model.
Layout under ``<run_dir>/predictions/``::

    <model>/<split>.npz     probs float16 (N,C,H,W) in [0,1]; ids (N,) str   (split: val|test|external)
    <model>/manifest.json   {"model", "status": running|complete|failed|interrupted,
                             "preset", "target", "config", "config_hash", "inputs", "checkpoint", "val_metrics", "splits",
                             "error", "started_at", "finished_at", "elapsed_s"}
    _truth/<split>.npz      masks uint8 (N,H,W) at working resolution; ids (N,) str;
                            optional images uint8 (N,H,W) (film for overlays) and
                            spacing float32 (N,2) mm per pixel (row, col), NaN if unknown

C == 1 is region mode (P(foreground)); C == 5 is vertebrae mode (softmax; 0 = background,
1..4 = Th8..Th11). Members are stored uncompressed so that `PredictionStore.probs` can
memory-map them: evaluating N images then needs memory for one chunk, not for N.
Numpy alone reads the store::

    import numpy as np
    pred = np.load("run/predictions/unet-resnet34/test.npz")
    truth = np.load("run/predictions/_truth/test.npz")
    assert (pred["ids"] == truth["ids"]).all()
    labels = pred["probs"][:, 0] > 0.5 if pred["probs"].shape[1] == 1 else pred["probs"].argmax(1)
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spineseg.ensemble.npz import member_names, read_ids, read_member, read_rows, read_rows_into
from spineseg.ensemble.tta import suffix as tta_suffix
from spineseg.errors import StoreError
from spineseg.names import MAX_LABEL, PREDICTIONS_DIR
from spineseg.names import STORED_SPLITS as SPLITS
from spineseg.utils.io import atomic_savez, atomic_write_json, file_digest

STATUSES: tuple[str, ...] = ("running", "complete", "failed", "interrupted")
CHANNELS: tuple[int, ...] = (1, 5)  # region, vertebrae
TRUTH_DIR = "_truth"
#: float16 rounding and sigmoid/softmax round-off stay well inside this.
PROB_TOL = 1e-3
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]*$")
#: (path, size, mtime, digest) of prediction files already verified in this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()
_VALIDATE_ROWS = 32  # images validated / converted at a time when writing


@dataclass(frozen=True)
class Truth:
    """Ground truth of one split; `masks` (and `images`) are memory-mapped."""

    split: str
    masks: np.ndarray
    ids: np.ndarray
    images: np.ndarray | None = None
    spacing: np.ndarray | None = None
    #: (N,H,W) uint8 Th8..Th11 as 1..4 whatever the target (None: the source had none),
    #: for the level-error metric.
    vertebrae: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.masks.shape[0])

    @property
    def distance_spacing(self) -> np.ndarray | None:
        """(N,2) mm spacing when known for every image, else None (distances in pixels);
        mixing mm and pixels in one mean would be meaningless."""
        if self.spacing is None or not np.isfinite(self.spacing).all():
            return None
        return np.asarray(self.spacing, dtype=np.float64)


@dataclass(frozen=True)
class SplitData:
    """One split of several models, checked to agree with each other and with the truth."""

    split: str
    truth: Truth
    probs: dict[str, np.ndarray]  # model -> (N,C,H,W) float16 memmap

    @property
    def channels(self) -> int:
        return int(next(iter(self.probs.values())).shape[1])

    @property
    def num_classes(self) -> int:
        """Label count of the metrics: background + foreground in region mode."""
        return max(2, self.channels)


class PredictionStore:
    """Reads and writes `<run_dir>/predictions/`; every write is atomic and validated first,
    so a failing call never replaces what is already there."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / PREDICTIONS_DIR

    def __repr__(self) -> str:
        return f"PredictionStore({str(self.run_dir)!r})"

    # ------------------------------------------------------------------ paths
    def model_dir(self, model: str) -> Path:
        _check_model_name(model)
        return self.root / model

    def probs_path(self, model: str, split: str, tta: str = "none") -> Path:
        """`<split>.npz`, or `<split>+flip.npz` for a test-time-augmented variant."""
        return self.model_dir(model) / f"{_check_split(split)}{tta_suffix(tta)}.npz"

    def truth_path(self, split: str) -> Path:
        return self.root / TRUTH_DIR / f"{_check_split(split)}.npz"

    def manifest_path(self, model: str) -> Path:
        return self.model_dir(model) / "manifest.json"

    # ------------------------------------------------------------------ writing
    def write_probs(
        self, model: str, split: str, probs: Any, ids: Sequence[str], tta: str = "none"
    ) -> Path:
        """Validate (float, 4-D, finite, in [0,1]) and store as float16 with the ids."""
        path = self.probs_path(model, split, tta)
        where = f"model {model!r} split {split!r}"
        arr = _as_numpy(probs)
        if arr.ndim != 4:
            raise StoreError(f"{where}: probs must be (N,C,H,W), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise StoreError(f"{where}: probs must be floating point, got {arr.dtype}")
        if arr.shape[1] not in CHANNELS:
            raise StoreError(f"{where}: probs have {arr.shape[1]} channels; expected 1 or 5")
        id_arr = _as_ids(ids, arr.shape[0], where)
        out = np.empty(arr.shape, dtype=np.float16)
        for start in range(0, arr.shape[0], _VALIDATE_ROWS):
            block = arr[start : start + _VALIDATE_ROWS]
            check_probs_chunk(block, model, split, id_arr[start : start + _VALIDATE_ROWS])
            out[start : start + _VALIDATE_ROWS] = np.clip(block, 0.0, 1.0)
        atomic_savez(path, probs=out, ids=id_arr)
        return path

    def write_truth(
        self,
        split: str,
        masks: Any,
        ids: Sequence[str],
        images: Any | None = None,
        spacing: Any | None = None,
        vertebrae: Any | None = None,
    ) -> Path:
        """Store the masks metrics use (and, when known, the Th8..Th11 labels 1..4 that the
        level-error metric needs in every mode). Every model's process may call this: an
        identical truth is a no-op, a different one is an error (the split would be
        ambiguous)."""
        path = self.truth_path(split)
        where = f"truth of split {split!r}"
        masks = _as_numpy(masks)
        if masks.ndim != 3:
            raise StoreError(f"{where}: masks must be (N,H,W), got shape {masks.shape}")
        if not np.issubdtype(masks.dtype, np.integer) and masks.dtype != np.bool_:
            raise StoreError(f"{where}: masks must be integer labels, got {masks.dtype}")
        if masks.size and (masks.min() < 0 or masks.max() > MAX_LABEL):
            raise StoreError(f"{where}: mask labels must be in 0..{MAX_LABEL}")
        n = masks.shape[0]
        arrays: dict[str, np.ndarray] = {
            "masks": masks.astype(np.uint8),
            "ids": _as_ids(ids, n, where),
        }
        if images is not None:
            images = _as_numpy(images)
            if images.shape != masks.shape:
                raise StoreError(f"{where}: images {images.shape} differ from masks {masks.shape}")
            if images.dtype != np.uint8:
                raise StoreError(f"{where}: images must be uint8, got {images.dtype}")
            arrays["images"] = images
        if vertebrae is not None:
            vertebrae = _as_numpy(vertebrae)
            if vertebrae.shape != masks.shape:
                raise StoreError(
                    f"{where}: vertebrae {vertebrae.shape} differ from masks {masks.shape}"
                )
            if vertebrae.size and (vertebrae.min() < 0 or vertebrae.max() > MAX_LABEL):
                raise StoreError(f"{where}: vertebra labels must be in 0..{MAX_LABEL}")
            arrays["vertebrae"] = vertebrae.astype(np.uint8)
        if spacing is not None:
            sp = np.asarray(spacing, dtype=np.float32)
            if sp.shape == (2,):
                sp = np.broadcast_to(sp, (n, 2)).copy()
            if sp.shape != (n, 2):
                raise StoreError(f"{where}: spacing must be (N,2) or (2,), got {sp.shape}")
            arrays["spacing"] = sp
        if path.exists():
            stored = self._load_all(path)
            # The films are kept for overlays only, so models that differ in preprocessing
            # share one truth: the first writer's films stay.
            same, new = _truth_identity(stored), _truth_identity(arrays)
            if _same_arrays(same, new):
                return path
            # A truth written before the vertebrae were stored gains them; nothing else changes.
            older = {k: v for k, v in new.items() if k != "vertebrae"}
            if "vertebrae" in stored or not _same_arrays(same, older):
                raise StoreError(
                    f"{path}: a different truth for split {split!r} is already stored; "
                    "remove it (or use a new run_dir) to replace it"
                )
            if "images" in stored:
                arrays["images"] = stored["images"]
        atomic_savez(path, **arrays)
        return path

    def write_manifest(self, model: str, manifest: dict[str, Any]) -> Path:
        path = self.manifest_path(model)
        data = dict(manifest)
        if data.setdefault("model", model) != model:
            raise StoreError(f"{path}: manifest names model {data['model']!r}, not {model!r}")
        if data.get("status") not in STATUSES:
            raise StoreError(
                f"{path}: status {data.get('status')!r}; valid choices: {', '.join(STATUSES)}"
            )
        atomic_write_json(path, data)
        return path

    # ------------------------------------------------------------------ reading
    def read_manifest(self, model: str) -> dict[str, Any] | None:
        path = self.manifest_path(model)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"{path}: unreadable manifest ({err})") from err
        if not isinstance(data, dict):
            raise StoreError(f"{path}: manifest is not a JSON object")
        return data

    def models(self, status: str | None = "complete") -> list[str]:
        """Model folders (sorted), filtered by manifest status; None lists every folder."""
        if status is not None and status not in STATUSES:
            raise StoreError(f"unknown status {status!r}; valid choices: {', '.join(STATUSES)}")
        if not self.root.is_dir():
            return []
        names = sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", "_")) and _MODEL_NAME.match(p.name)
        )
        if status is None:
            return names
        return [m for m in names if (self._status(m) == status)]

    def _status(self, model: str) -> str | None:
        try:
            manifest = self.read_manifest(model)
        except StoreError:
            return None
        return None if manifest is None else manifest.get("status")

    def splits_of(self, model: str) -> list[str]:
        return [s for s in SPLITS if self.probs_path(model, s).is_file()]

    def is_complete(self, model: str, splits: Sequence[str]) -> bool:
        """Manifest says complete and every split's file opens with consistent headers."""
        if self._status(model) != "complete":
            return False
        try:
            for split in splits:
                self.probs(model, split)
                self.ids(model, split)
        except StoreError:
            return False
        return True

    def verify(self, model: str, splits: Sequence[str]) -> None:
        """Check each split's file against the digest its manifest recorded (`digests`),
        once per file and version in a process; a mismatch is a StoreError naming the file.
        Manifests written before digests were recorded are not checked."""
        recorded = (self.read_manifest(model) or {}).get("digests") or {}
        for name, digest in recorded.items():
            split, _, variant = name.partition("+")  # val, val+flip, ...
            if split not in splits:
                continue
            path = self.probs_path(model, split, variant or "none")
            if not path.is_file():
                continue
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns, digest)
            if key in _VERIFIED:
                continue
            actual = file_digest(path)
            if actual != digest:
                raise StoreError(
                    f"{path}: damaged (its bytes give {actual}, the manifest recorded "
                    f"{digest}); retrain the model (delete {path.parent}) to replace it"
                )
            _VERIFIED.add(key)

    def probs(self, model: str, split: str, mmap: bool = True, tta: str = "none") -> np.ndarray:
        """(N,C,H,W) float16, memory-mapped unless `mmap` is False (or the member is
        compressed), so a chunk costs memory only when it is sliced out."""
        path = self._existing(self.probs_path(model, split, tta), f"model {model!r}", split)
        arr = read_member(path, "probs", mmap)
        ids = self.ids(model, split, tta)
        if arr.ndim != 4 or arr.shape[1] not in CHANNELS or arr.dtype != np.float16:
            raise StoreError(
                f"{path}: probs must be float16 (N,C,H,W) with C in 1|5, got "
                f"{arr.dtype} {arr.shape}"
            )
        if arr.shape[0] != len(ids):
            raise StoreError(f"{path}: {arr.shape[0]} probability maps but {len(ids)} ids")
        return arr

    def ids(self, model: str, split: str, tta: str = "none") -> np.ndarray:
        path = self._existing(self.probs_path(model, split, tta), f"model {model!r}", split)
        return read_ids(path)

    def truth(self, split: str) -> Truth:
        path = self._existing(self.truth_path(split), "truth", split)
        masks = read_member(path, "masks", True)
        ids = read_ids(path)
        members = member_names(path)
        images = read_member(path, "images", True) if "images" in members else None
        spacing = read_member(path, "spacing", False) if "spacing" in members else None
        vertebrae = read_member(path, "vertebrae", True) if "vertebrae" in members else None
        if masks.ndim != 3 or masks.shape[0] != len(ids):
            raise StoreError(f"{path}: masks {masks.shape} do not match {len(ids)} ids")
        if images is not None and images.shape != masks.shape:
            raise StoreError(f"{path}: images {images.shape} differ from masks {masks.shape}")
        if spacing is not None and spacing.shape != (len(ids), 2):
            raise StoreError(f"{path}: spacing {spacing.shape} is not ({len(ids)}, 2)")
        if vertebrae is not None and vertebrae.shape != masks.shape:
            raise StoreError(f"{path}: vertebrae {vertebrae.shape} differ from masks {masks.shape}")
        return Truth(split, masks, ids, images, spacing, vertebrae)

    def has_truth(self, split: str) -> bool:
        return self.truth_path(split).is_file()

    def has_tta(self, models: Sequence[str], split: str, tta: str) -> bool:
        """Whether every model stored `split` under the test-time augmentation `tta`."""
        return all(self.probs_path(m, split, tta).is_file() for m in models)

    def open_split(self, models: Sequence[str], split: str, tta: str = "none") -> SplitData:
        """The truth and every model's memmap of `split`, after checking that ids, image
        sizes and channel counts agree; errors name the model, split and first odd id."""
        if not models:
            raise StoreError(f"split {split!r}: no models to read")
        missing = [m for m in models if not self.probs_path(m, split, tta).is_file()]
        if missing:
            raise StoreError(
                f"split {split!r} is missing for model(s) {', '.join(missing)} "
                f"(e.g. {self.probs_path(missing[0], split, tta)})"
            )
        truth = self.truth(split)
        probs: dict[str, np.ndarray] = {}
        channels: int | None = None
        for model in models:
            check_ids(self.ids(model, split, tta), truth.ids, model, split)
            arr = self.probs(model, split, tta=tta)
            if arr.shape[2:] != truth.masks.shape[1:]:
                raise StoreError(
                    f"model {model!r} split {split!r}: probability maps are "
                    f"{tuple(arr.shape[2:])} but truth masks are {tuple(truth.masks.shape[1:])}"
                )
            if channels is not None and arr.shape[1] != channels:
                raise StoreError(
                    f"model {model!r} split {split!r}: {arr.shape[1]} channels, but "
                    f"{models[0]!r} has {channels}; region and vertebrae models cannot be mixed"
                )
            channels = arr.shape[1]
            probs[model] = arr
        # No scan of the masks here (it would map all N of them): in region mode the metrics
        # score any nonzero label as foreground, i.e. the union Th8..Th11 the region is.
        return SplitData(split, truth, probs)

    # ------------------------------------------------------------------ internals
    def _existing(self, path: Path, who: str, split: str) -> Path:
        if not path.is_file():
            raise StoreError(f"{who} has no {split!r} split: {path} does not exist")
        return path

    def _load_all(self, path: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise StoreError(f"{path}: corrupt or truncated npz ({err})") from err


# ---------------------------------------------------------------------- chunked reading
def iter_chunks(n: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise StoreError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def load_chunk(
    arrays: Sequence[np.ndarray],
    models: Sequence[str],
    split: str,
    ids: np.ndarray,
    sl: slice | np.ndarray,
) -> np.ndarray:
    """(K,n,C,H,W) float32 of images `sl` (slice or index array) from K arrays (memmaps or
    in memory), value-checked, so that only this chunk is ever resident."""
    index = np.arange(len(ids))[sl]
    # torch's allocator + cast: numpy's float16 cast is ~8x slower, and torch copying into
    # freshly mmapped numpy pages from two threads stalls on page faults.
    out = torch.empty((len(arrays), len(index), *arrays[0].shape[1:]), dtype=torch.float32)
    for k, (arr, model) in enumerate(zip(arrays, models, strict=True)):
        src = read_rows(arr, sl)
        if src.flags.writeable and src.dtype.isnative and src.flags.c_contiguous:
            out[k].copy_(torch.from_numpy(src))
        else:  # torch refuses read-only / byte-swapped arrays
            out[k].numpy()[...] = src
        check_probs_chunk(out[k].numpy(), model, split, ids[sl])
    return out.numpy()


def iter_raw_chunks(
    arrays: Sequence[np.ndarray], chunk_size: int, prefetch: bool = True
) -> Iterator[tuple[slice, np.ndarray]]:
    """(slice, (K, n, ...) array) per chunk of images: the K arrays' rows, as stored
    (float16 from the store), not yet value-checked.

    Two buffers are reused, and while the caller works on one chunk a thread reads the next
    (`pread` of a memmapped file releases the GIL), so reading overlaps computing. The
    array yielded is overwritten two chunks later: copy what must outlive that."""
    n, k = int(arrays[0].shape[0]), len(arrays)
    row = tuple(arrays[0].shape[1:])
    dtype = np.result_type(*[a.dtype for a in arrays])
    per_image = int(np.prod(row, dtype=np.int64))
    slices = iter_chunks(n, chunk_size)
    if not slices:
        return
    size = k * min(chunk_size, n) * per_image
    buffers = [np.empty(size, dtype=dtype) for _ in range(2 if prefetch and len(slices) > 1 else 1)]

    def fill(which: int, sl: slice) -> np.ndarray:
        m = sl.stop - sl.start
        out = buffers[which][: k * m * per_image].reshape(k, m, *row)
        for j, arr in enumerate(arrays):
            read_rows_into(arr, sl, out[j])
        return out

    if len(buffers) == 1:
        for sl in slices:
            yield sl, fill(0, sl)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spineseg-read") as pool:
        pending = pool.submit(fill, 0, slices[0])
        for i, sl in enumerate(slices):
            chunk = pending.result()
            if i + 1 < len(slices):
                pending = pool.submit(fill, (i + 1) % 2, slices[i + 1])
            yield sl, chunk


# ---------------------------------------------------------------------- validation helpers
def check_probs_chunk(
    chunk: np.ndarray, model: str, split: str, ids: Sequence[str], tol: float = PROB_TOL
) -> None:
    """Raise StoreError naming model, split and image if a chunk holds NaN/inf or values
    outside [0,1]; evaluation calls this on every chunk it reads."""
    flat = np.asarray(chunk).reshape(len(chunk), -1)
    if flat.shape[1] == 0:
        return
    # min/max propagate NaN and expose inf: two reductions, no temporary mask
    low, high = flat.min(axis=1), flat.max(axis=1)
    finite = np.isfinite(low) & np.isfinite(high)
    if not finite.all():
        i = int(np.argmin(finite))
        raise StoreError(
            f"model {model!r} split {split!r} image {str(ids[i])!r}: "
            "probabilities contain NaN or inf"
        )
    bad = (low < -tol) | (high > 1 + tol)
    if bad.any():
        i = int(np.argmax(bad))
        raise StoreError(
            f"model {model!r} split {split!r} image {str(ids[i])!r}: probabilities "
            f"outside [0,1] (min {low[i]:.4g}, max {high[i]:.4g})"
        )


def checked_float32(
    raw: np.ndarray, models: Sequence[str], split: str, ids: Sequence[str]
) -> torch.Tensor:
    """A raw (K, n, ...) chunk as float32, each model's rows value-checked (`check_probs_chunk`)."""
    chunk = torch.from_numpy(raw).to(torch.float32)
    for k, model in enumerate(models):
        check_probs_chunk(chunk[k].numpy(), model, split, ids)
    return chunk


def check_ids(ids: np.ndarray, expected: np.ndarray, model: str, split: str) -> None:
    """Predictions must list exactly the truth's images in the truth's order."""
    if len(ids) == len(expected) and np.array_equal(ids, expected):
        return
    n = min(len(ids), len(expected))
    diff = np.flatnonzero(np.asarray(ids[:n]) != np.asarray(expected[:n]))
    if diff.size:
        i = int(diff[0])
        raise StoreError(
            f"model {model!r} split {split!r}: ids differ from the truth at "
            f"index {i}: {str(ids[i])!r} vs {str(expected[i])!r}"
        )
    raise StoreError(
        f"model {model!r} split {split!r}: {len(ids)} ids but the truth has "
        f"{len(expected)} (first extra id: "
        f"{str((ids if len(ids) > n else expected)[n])!r})"
    )


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise StoreError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
    return split


def _check_model_name(model: str) -> None:
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise StoreError(
            f"invalid model name {model!r}: use letters, digits and ._+=@,- "
            "(not starting with _ or .)"
        )


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_ids(ids: Sequence[str], n: int, where: str) -> np.ndarray:
    arr = np.asarray([str(i) for i in ids], dtype=str)
    if arr.ndim != 1 or len(arr) != n:
        raise StoreError(f"{where}: {len(arr)} ids for {n} images")
    if n == 0:
        raise StoreError(f"{where}: no images")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"{where}: duplicate id {str(uniq[np.argmax(counts > 1)])!r}")
    return arr


def _truth_identity(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k != "images"}


def _same_arrays(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> bool:
    if set(old) != set(new):
        return False
    return all(
        old[k].shape == new[k].shape
        and np.array_equal(old[k], new[k], equal_nan=new[k].dtype.kind == "f")
        for k in new
    )
