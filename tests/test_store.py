"""The prediction store: round trips, memory maps, validation, atomicity, clear errors."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from ensemble_fixtures import make_store, noisy_probs, write_manifest

from spineseg.ensemble.store import PredictionStore, iter_chunks, load_chunk, read_rows
from spineseg.errors import StoreError

IDS = [f"img{i}" for i in range(6)]


def _probs(n: int = 6, c: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, c, 8, 6)).astype(np.float32)


def _files(root) -> dict[str, bytes]:
    """Every file under root (temporaries included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_probs_round_trip_as_float16_memmap(tmp_path):
    store = PredictionStore(tmp_path)
    probs = _probs()
    path = store.write_probs("m0", "test", torch.from_numpy(probs), IDS)
    assert path == tmp_path / "predictions" / "m0" / "test.npz"
    back = store.probs("m0", "test")
    assert isinstance(back, np.memmap)
    assert back.dtype == np.float16 and back.shape == probs.shape
    np.testing.assert_allclose(back, probs, atol=1e-3)
    assert store.ids("m0", "test").tolist() == IDS
    assert store.splits_of("m0") == ["test"]


def test_mmap_chunks_equal_full_read(tmp_path):
    store = PredictionStore(tmp_path)
    store.write_probs("m0", "val", _probs(c=5), IDS)
    full = store.probs("m0", "val", mmap=False)
    mapped = store.probs("m0", "val")
    assert not isinstance(full, np.memmap)
    for sl in iter_chunks(len(IDS), 4):
        np.testing.assert_array_equal(np.asarray(mapped[sl]), full[sl])
        np.testing.assert_array_equal(read_rows(mapped, sl), full[sl])  # the pread path
        chunk = load_chunk([mapped, full], ["a", "b"], "val", np.array(IDS), sl)
        assert chunk.dtype == np.float32 and chunk.shape == (2, *full[sl].shape)
        np.testing.assert_array_equal(chunk[0], chunk[1])
    np.testing.assert_array_equal(read_rows(mapped, np.array([4, 1])), full[[4, 1]])


def test_compressed_npz_is_read_without_mmap(tmp_path):
    store = PredictionStore(tmp_path)
    path = store.probs_path("m0", "test")
    path.parent.mkdir(parents=True)
    probs = _probs().astype(np.float16)
    np.savez_compressed(path, probs=probs, ids=np.array(IDS))
    np.testing.assert_array_equal(store.probs("m0", "test"), probs)


def test_layout_is_readable_with_numpy_alone(tmp_path):
    store = make_store(tmp_path, models=("m0",), sizes={"test": 3})
    pred = np.load(tmp_path / "predictions" / "m0" / "test.npz")
    truth = np.load(tmp_path / "predictions" / "_truth" / "test.npz")
    assert (pred["ids"] == truth["ids"]).all()
    assert pred["probs"].dtype == np.float16 and truth["masks"].dtype == np.uint8
    assert truth["spacing"].shape == (3, 2) and truth["images"].shape == truth["masks"].shape
    assert store.truth("test").distance_spacing is not None


def test_truth_round_trip_and_identical_rewrite_is_a_noop(tmp_path):
    store = PredictionStore(tmp_path)
    masks = (np.random.default_rng(0).random((6, 8, 6)) > 0.5).astype(np.uint8)
    path = store.write_truth("test", masks, IDS, spacing=(0.4, 0.5))
    before = path.stat().st_mtime_ns
    store.write_truth("test", masks, IDS, spacing=(0.4, 0.5))
    assert path.stat().st_mtime_ns == before
    truth = store.truth("test")
    assert isinstance(truth.masks, np.memmap)
    np.testing.assert_array_equal(truth.masks, masks)
    np.testing.assert_allclose(truth.spacing, [[0.4, 0.5]] * 6)
    assert truth.images is None


def test_different_truth_is_refused_and_kept(tmp_path):
    store = PredictionStore(tmp_path)
    masks = np.zeros((6, 8, 6), dtype=np.uint8)
    store.write_truth("test", masks, IDS)
    before = _files(tmp_path)
    with pytest.raises(StoreError, match="different truth"):
        store.write_truth("test", masks + 1, IDS)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p, ids: (np.where(p > 0.9, np.nan, p), ids), "NaN"),
        (lambda p, ids: (p + 0.5, ids), "outside"),
        (lambda p, ids: (p - 0.5, ids), "outside"),
        (lambda p, ids: (p[:, 0], ids), "shape"),
        (lambda p, ids: ((p > 0.5).astype(np.int64), ids), "floating"),
        (lambda p, ids: (np.repeat(p, 3, axis=1), ids), "channels"),
        (lambda p, ids: (p, ids[:-1]), "ids"),
        (lambda p, ids: (p, [*ids[:-1], ids[0]]), "duplicate"),
    ],
)
def test_bad_probs_are_refused_and_old_file_kept(tmp_path, mutate, message):
    store = PredictionStore(tmp_path)
    store.write_probs("m0", "test", _probs(), IDS)
    before = _files(tmp_path)
    probs, ids = mutate(_probs(seed=1), IDS)
    with pytest.raises(StoreError, match=message) as err:
        store.write_probs("m0", "test", probs, ids)
    assert "'m0'" in str(err.value) and "'test'" in str(err.value)
    assert _files(tmp_path) == before


def test_failing_write_leaves_the_old_file(tmp_path, monkeypatch):
    store = PredictionStore(tmp_path)
    store.write_probs("m0", "test", _probs(), IDS)
    before = _files(tmp_path)

    def crash(fh, **arrays):
        fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write_probs("m0", "test", _probs(seed=2), IDS)
    assert _files(tmp_path) == before  # neither torn file nor temporary left behind


def test_manifests_and_model_listing(tmp_path):
    store = make_store(tmp_path, models=("b", "a", "c"), sizes={"val": 2})
    write_manifest(store, "c", status="failed", splits=["val"], error="boom")
    assert store.models() == ["a", "b"]
    assert store.models("failed") == ["c"]
    assert store.models(None) == ["a", "b", "c"]  # _truth is not a model
    assert store.read_manifest("a")["status"] == "complete"
    assert store.read_manifest("nobody") is None
    assert store.is_complete("a", ["val"]) and not store.is_complete("a", ["val", "test"])
    assert not store.is_complete("c", ["val"])
    with pytest.raises(StoreError, match="status"):
        store.write_manifest("a", {"status": "done"})
    assert store.read_manifest("a")["status"] == "complete"
    (tmp_path / "predictions" / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest\.json"):
        store.read_manifest("a")
    with pytest.raises(StoreError, match="invalid model name"):
        store.write_probs("../x", "val", _probs(), IDS)
    with pytest.raises(StoreError, match="unknown split"):
        store.probs("a", "train")


def test_open_split_checks_ids_shapes_and_missing_splits(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"), sizes={"test": 4})
    data = store.open_split(["m0", "m1"], "test")
    assert data.channels == 1 and data.truth.n == 4

    ids = [f"test-{i:03d}" for i in range(4)]
    store.write_probs("m1", "test", store.probs("m1", "test"), [*ids[:2], "other", ids[3]])
    with pytest.raises(StoreError, match=r"'m1' split 'test'.*index 2: 'other' vs 'test-002'"):
        store.open_split(["m0", "m1"], "test")

    store.write_probs("m1", "test", np.zeros((4, 1, 16, 32)), ids)
    with pytest.raises(StoreError, match=r"'m1' split 'test'.*\(16, 32\)"):
        store.open_split(["m0", "m1"], "test")

    store.write_probs("m1", "test", np.full((4, 5, 32, 32), 0.2), ids)
    with pytest.raises(StoreError, match="channels"):
        store.open_split(["m0", "m1"], "test")

    with pytest.raises(StoreError, match=r"'external' is missing for model\(s\) m0, m1"):
        store.open_split(["m0", "m1"], "external")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_npz_names_the_file(tmp_path, damage):
    store = make_store(tmp_path, models=("m0",), sizes={"test": 3})
    path = store.probs_path("m0", "test")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"x" * len(data))
    with pytest.raises(StoreError, match=str(path)):
        store.probs("m0", "test")
    assert not store.is_complete("m0", ["test"])


def test_truncated_member_is_detected(tmp_path):
    """A zip whose directory is intact but whose data is short (e.g. a rewritten member)."""
    store = PredictionStore(tmp_path)
    path = store.probs_path("m0", "test")
    path.parent.mkdir(parents=True)
    full = np.zeros((6, 1, 8, 6), dtype=np.float16)
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("probs.npy", "w") as fh:
            np.lib.format.write_array(fh, full)
        zf.writestr("ids.npy", b"")  # header cut off
    with pytest.raises(StoreError, match=str(path)):
        store.ids("m0", "test")


def test_chunk_reader_names_model_split_and_image(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"), sizes={"test": 5})
    bad = np.array(store.probs("m1", "test"), dtype=np.float16)
    bad[3, 0, 2, 2] = np.nan
    ids = store.ids("m1", "test")
    np.savez(store.probs_path("m1", "test"), probs=bad, ids=ids)  # bypasses validation
    data = store.open_split(["m0", "m1"], "test")
    arrays = [data.probs["m0"], data.probs["m1"]]
    load_chunk(arrays, ["m0", "m1"], "test", ids, slice(0, 2))  # clean chunk reads fine
    with pytest.raises(StoreError, match=r"'m1' split 'test' image 'test-003'.*NaN"):
        load_chunk(arrays, ["m0", "m1"], "test", ids, slice(2, 5))
    bad[3, 0, 2, 2] = 1.5
    np.savez(store.probs_path("m1", "test"), probs=bad, ids=ids)
    with pytest.raises(StoreError, match=r"image 'test-003'.*outside \[0,1\]"):
        load_chunk([store.probs("m1", "test")], ["m1"], "test", ids, slice(0, 5))


def test_vertebrae_probs_and_label_range(tmp_path):
    store = PredictionStore(tmp_path)
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 5, size=(6, 8, 6)).astype(np.uint8)
    store.write_truth("val", masks, IDS)
    store.write_probs("m0", "val", noisy_probs(masks, 5, 1.0, rng), IDS)
    assert store.open_split(["m0"], "val").num_classes == 5
    with pytest.raises(StoreError, match="labels"):
        store.write_truth("test", masks + 5, IDS)
    assert json.loads(json.dumps(store.truth("val").ids.tolist())) == IDS
