"""One ONNX graph for the whole ensemble: onnxruntime reproduces PyTorch, predict runs it
without PyTorch models, and a graph from another run is refused."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_predict import film, make_run

from spineseg.cli.export import TOLERANCE, compare
from spineseg.cli.predict import main as predict
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import ConfigError, StoreError
from spineseg.onnx_export import OnnxEnsemble, export, read_metadata

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    run = make_run(tmp_path_factory.mktemp("onnx") / "run", threshold=0.45)
    rng = np.random.default_rng(0)
    images = np.stack([cv2.resize(film(128, 96, seed=i), (64, 64)) for i in range(6)])
    masks = (rng.random((6, 64, 64)) > 0.7).astype(np.uint8)
    PredictionStore(run).write_truth("test", masks, [f"t{i}" for i in range(6)], images=images)
    return run, export(run, run / "ensemble.onnx", rule="soft")


def test_onnxruntime_reproduces_the_pytorch_ensemble(exported) -> None:
    run, path = exported
    meta = read_metadata(path)
    assert meta["models"] == ["m0", "m1"] and meta["rule"] == "soft"
    assert meta["pipeline"]["image_size"] == [64, 64] and meta["threshold"] == 0.45
    c = compare(run, path, "soft")
    assert c["films"] == 6 and c["max_abs_diff"] <= TOLERANCE
    assert c["labels_differ"] == c["differ_at_threshold"]  # only where p is at the threshold


@pytest.mark.parametrize("rule", ["weighted"])  # the one whose inputs are checked before tracing
def test_every_fixed_rule_exports(exported, tmp_path, rule) -> None:
    run, _ = exported
    path = export(run, tmp_path / f"{rule}.onnx", rule=rule)
    assert compare(run, path, rule)["max_abs_diff"] <= TOLERANCE


def test_predict_with_the_onnx_engine_matches_pytorch(exported, tmp_path) -> None:
    run, path = exported
    src = tmp_path / "films"
    src.mkdir()
    for i, (h, w) in enumerate([(150, 60), (90, 70)]):
        cv2.imwrite(str(src / f"f{i}.png"), film(h, w, seed=i))
    common = [f"input={src}", "progress=false", "overlay=false"]
    assert predict([f"run_dir={run}", f"output={tmp_path / 'torch'}", *common]) == 0
    assert predict(["engine=onnx", f"model={path}", f"output={tmp_path / 'onnx'}", *common]) == 0
    for name in ("f0_mask.png", "f1_mask.png"):
        a = cv2.imread(str(tmp_path / "torch" / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "onnx" / name), cv2.IMREAD_UNCHANGED)
        assert (a != b).mean() < 1e-3  # identical but for pixels at the threshold


def test_a_graph_from_another_run_and_staple_are_refused(exported, tmp_path) -> None:
    run, path = exported
    other = make_run(tmp_path / "other")
    selection = json.loads((other / "ensemble" / "selection.json").read_text())
    selection["set_id"] = "f" * 32
    (other / "ensemble" / "selection.json").write_text(json.dumps(selection))
    with pytest.raises(StoreError, match="exported from another ensemble"):
        OnnxEnsemble(path, other)
    with pytest.raises(ConfigError, match="'staple' cannot be exported"):
        export(run, tmp_path / "s.onnx", rule="staple")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(StoreError, match=r"junk\.onnx: not an ONNX file"):
        read_metadata(tmp_path / "junk.onnx")
    with pytest.raises(StoreError, match=r"gone\.onnx: file not found \(model= is the \.onnx"):
        read_metadata(tmp_path / "gone.onnx")
