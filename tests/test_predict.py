"""`spineseg-predict` on a tiny run dir made without training: two random-weight models
saved as Lightning checkpoints, manifests and a selection.json as the real tools write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch

from spineseg.cli.predict import main as cli_main
from spineseg.config import build
from spineseg.data import geometry as G
from spineseg.ensemble import postprocess, rules, voting
from spineseg.ensemble.selection import Selection, save_selection
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import ConfigError, StoreError
from spineseg.predict import load_ensemble

MODELS = ("m0", "m1")


def make_run(
    run_dir: Path,
    threshold: float = 0.5,
    target: str = "region",
    resize: str = "stretch",
    crop: dict | None = None,
    members: dict[str, dict] | None = None,
) -> Path:
    """Checkpoints, manifests and selection.json laid out as training + ensembling write them
    (`crop`: a cascade's stage 2, as `data.crop` records it; `members`: a model's own data
    settings, as a sweep over a data option records them)."""
    store = PredictionStore(run_dir)
    data = {"image_size": [64, 64], "resize": resize, "preprocess": "none", "target": target,
            "crop": crop}  # fmt: skip
    for i, name in enumerate(MODELS):
        own = {**data, **(members or {}).get(name, {})}
        config = {"data": own}
        torch.manual_seed(i)
        module = build("module", weights=None, target=own["target"], name=name)
        trainer = L.Trainer(
            max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
        trainer.strategy.connect(module)
        ckpt = run_dir / "jobs" / name / "best.ckpt"
        ckpt.parent.mkdir(parents=True)
        trainer.save_checkpoint(ckpt)
        store.write_manifest(
            name,
            {
                "status": "complete",
                "checkpoint": str(ckpt),
                "config": config,
                "target": own["target"],
            },
        )
    selection = Selection(
        models=list(MODELS),
        weights=[0.6, 0.4],
        scores={"m0": 0.8, "m1": 0.7},
        thresholds={r: threshold for r in rules.RULES},
        method="top_k",
        k=2,
        n_val=4,
        best_single="m0",
    )
    save_selection(selection, run_dir / "ensemble" / "selection.json")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", threshold=0.45)


def film(h: int, w: int, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2))
    peak = np.iinfo(dtype).max
    return np.clip(base * peak * 0.8 + rng.normal(0, peak * 0.05, (h, w)), 0, peak).astype(dtype)


def test_prediction_at_original_size_matches_fused_probability(run_dir):
    ens = load_ensemble(run_dir, rule="weighted")
    assert ens.names == list(MODELS) and ens.threshold == 0.45
    image = film(150, 90)
    pred = ens.predict(image)
    assert pred.probability.shape == pred.labels.shape == pred.uncertainty.shape == (150, 90)
    assert pred.probability.dtype == np.float32 and pred.labels.dtype == np.uint8
    # Independent recomputation: the training pipeline, each model, the rule, then back.
    x = torch.from_numpy(cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)).float()
    x = ((x / 255.0 - 0.449) / 0.226)[None, None]
    with torch.inference_mode():
        probs = torch.stack([torch.sigmoid(m(x)) for m in ens.models])
    scores = voting.weighted_vote(probs, weights=[0.6, 0.4])[0, 0].numpy()
    g = G.plan((150, 90), (64, 64), "stretch")
    back = G.to_original(scores, g)
    np.testing.assert_allclose(pred.probability, back, atol=2e-3)
    np.testing.assert_array_equal(pred.labels, (pred.probability > 0.45).astype(np.uint8))
    assert pred.probability.std() > 0  # a real map, not a constant


def test_hard_vote_decides_at_half_and_16_bit(run_dir):
    ens = load_ensemble(run_dir, rule="hard")
    pred = ens.predict(film(100, 70, np.uint16))
    assert pred.labels.shape == (100, 70)
    np.testing.assert_array_equal(pred.labels, (pred.probability > 0.5).astype(np.uint8))
    assert float(pred.uncertainty.min()) >= 0 and float(pred.uncertainty.max()) <= 1


def test_vertebrae_letterbox_labels_are_argmax_of_mapped_scores(tmp_path):
    ens = load_ensemble(make_run(tmp_path / "v", target="vertebrae", resize="letterbox"), "median")
    pred = ens.predict(film(150, 50))
    assert pred.labels.shape == (150, 50) and int(pred.labels.max()) <= 4
    assert float(pred.probability.min()) >= 0.0 and float(pred.probability.max()) <= 1.0
    assert pred.uncertainty.shape == (150, 50)


def test_missing_selection_and_checkpoint_are_store_errors(tmp_path, run_dir):
    with pytest.raises(StoreError, match="no predictions in run_dir"):
        load_ensemble(tmp_path)  # not a run at all
    (tmp_path / "trained" / "predictions").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"run `spineseg-ensemble run_dir=.*trained` first"):
        load_ensemble(tmp_path / "trained")  # trained, not ensembled
    broken = make_run(tmp_path / "broken")
    (broken / "jobs" / "m1" / "best.ckpt").unlink()
    with pytest.raises(StoreError, match=r"checkpoint .* does not exist"):
        load_ensemble(broken)


def test_cli_folder_writes_outputs_and_lists_corrupt_files(tmp_path, run_dir, capsys):
    """In-process (the subprocess path is covered by the error tests): saves a 12 s import."""
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), film(150, 90))
    cv2.imwrite(str(src / "b16.png"), film(120, 80, np.uint16, seed=1))
    (src / "c_corrupt.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    assert cli_main([f"run_dir={run_dir}", f"input={src}", f"output={out}", "device=auto"]) == 0
    printed = capsys.readouterr()
    assert "predicted 2 film(s)" in printed.out and "skipped 1" in printed.out
    assert "c_corrupt.png" in printed.err
    for stem, shape in (("a", (150, 90)), ("b16", (120, 80))):
        mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"), cv2.IMREAD_UNCHANGED)
        assert overlay.shape == (*shape, 3)
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == ["a.png", "b16.png"]
    assert rows[0]["height"] == "150" and rows[0]["width"] == "90" and rows[0]["rule"] == "soft"
    assert rows[0]["region_area_mm2"] == ""  # PNG carries no spacing
    a_mask = cv2.imread(str(out / "a_mask.png"), cv2.IMREAD_UNCHANGED)
    assert int(rows[0]["region_pixels"]) == int((a_mask > 0).sum())
    with open(out / "skipped.csv") as fh:
        skipped = list(csv.DictReader(fh))
    assert [s["file"] for s in skipped] == ["c_corrupt.png"] and skipped[0]["reason"]
    # The CLI mask is the library's prediction.
    lib = load_ensemble(run_dir).predict(cv2.imread(str(src / "a.png"), cv2.IMREAD_UNCHANGED))
    np.testing.assert_array_equal(a_mask, lib.labels * 255)


def test_cli_a_film_failing_in_the_pipeline_is_skipped_not_fatal(
    tmp_path, run_dir, monkeypatch, capsys
):
    """A folder run lists a film the model pipeline rejects and predicts the others; a
    single-file run fails with the file's name."""
    from spineseg.predict import Ensemble

    predict_batch = Ensemble.predict_batch

    def picky(self, images):  # the batch holding it fails, then the film alone
        if any(image.shape == (77, 50) for image in images):
            raise ValueError("cannot take 77x50 films")
        return predict_batch(self, images)

    monkeypatch.setattr(Ensemble, "predict_batch", picky)
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "good.png"), film(150, 90))
    cv2.imwrite(str(src / "odd.png"), film(77, 50))
    out = tmp_path / "out"
    assert cli_main([f"run_dir={run_dir}", f"input={src}", f"output={out}"]) == 0
    assert "skipped odd.png: ValueError: cannot take 77x50 films" in capsys.readouterr().err
    with open(out / "skipped.csv") as fh:
        assert [r["file"] for r in csv.DictReader(fh)] == ["odd.png"]
    with open(out / "predictions.csv") as fh:
        assert [r["file"] for r in csv.DictReader(fh)] == ["good.png"]
    assert not (out / "odd_mask.png").exists()
    with pytest.raises(SystemExit) as info:
        cli_main([f"run_dir={run_dir}", f"input={src / 'odd.png'}", f"output={out}_one"])
    assert info.value.code == 1
    assert "odd.png" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no_run_dir", "no_selection", "bad_key"])
def test_cli_errors_are_one_line(tmp_path, case, capsys, restore_logging):
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), film(40, 30))
    args = {
        "no_run_dir": [f"run_dir={tmp_path / 'nope'}"],
        "no_selection": [f"run_dir={tmp_path}"],
        "bad_key": [f"run_dir={tmp_path}", "rulez=soft"],
    }[case]
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, f"input={image}", f"output={tmp_path / 'out'}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err


def test_predict_uses_the_post_processing_chosen_on_validation(tmp_path):
    run = make_run(tmp_path / "pp", threshold=0.45)
    path = run / "ensemble" / "selection.json"
    selection = json.loads(path.read_text())
    selection["postprocess"] = {"soft": "spine", "hard": "none"}
    path.write_text(json.dumps(selection))
    image = film(150, 90)
    chosen = load_ensemble(run, rule="soft")
    assert chosen.postprocess == "spine" and load_ensemble(run, rule="hard").postprocess == "none"
    raw = load_ensemble(run, rule="soft", postprocess="none").predict(image)
    pred = chosen.predict(image)
    np.testing.assert_array_equal(pred.probability, raw.probability)  # labels only
    np.testing.assert_array_equal(pred.labels, postprocess.apply("spine", raw.labels))
    with pytest.raises(ConfigError, match="unknown post-processing"):
        load_ensemble(run, rule="soft", postprocess="blur")


def test_batched_prediction_equals_one_film_at_a_time(tmp_path, run_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(150, 90), (120, 80), (90, 60)]):
        cv2.imwrite(str(src / f"f{i}.png"), film(h, w, seed=i))
    (src / "bad.png").write_bytes(b"not a png")
    outs = {}
    for batch in ("1", "2"):
        out = tmp_path / f"out{batch}"
        args = [f"run_dir={run_dir}", f"input={src}", f"output={out}", f"batch_size={batch}"]
        assert cli_main([*args, "overlay=false", "progress=false"]) == 0
        outs[batch] = out
        assert "films/s" in capsys.readouterr().out
    for i in range(3):
        a = cv2.imread(str(outs["1"] / f"f{i}_mask.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(outs["2"] / f"f{i}_mask.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(a, b)
    with open(outs["2"] / "skipped.csv") as fh:
        assert [r["file"] for r in csv.DictReader(fh)] == ["bad.png"]
    with pytest.raises(SystemExit):
        cli_main([f"run_dir={run_dir}", f"input={src}", f"output={tmp_path}", "batch_size=0"])
    assert "batch_size must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_the_package_exports_load_ensemble_lazily(run_dir):
    import spineseg

    assert spineseg.load_ensemble is load_ensemble
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        spineseg.nope  # noqa: B018


def test_a_dicom_film_gets_a_dicom_seg_that_matches_the_png(tmp_path, run_dir):
    import highdicom as hd
    import pydicom
    from dicom_fixtures import write_dicom
    from pydicom.uid import generate_uid

    src = tmp_path / "films"
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    write_dicom(src / "film.dcm", film(96, 48, np.uint16), PatientID="P1", Modality="DX", **uids)
    write_dicom(src / "bare.dcm", film(96, 48, np.uint16, seed=1))  # no Study/Series UIDs
    out = tmp_path / "out"
    assert cli_main([f"run_dir={run_dir}", f"input={src}", f"output={out}", "progress=false"]) == 0
    seg = hd.seg.segread(out / "film_seg.dcm")
    source = pydicom.dcmread(src / "film.dcm")
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == "P1"
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Th8-Th11"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "122495006"
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)
    png = cv2.imread(str(out / "film_mask.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(pixels[0], png // 255)
    assert (out / "bare_mask.png").is_file() and not (out / "bare_seg.dcm").exists()
    with open(out / "skipped.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"file": "bare.dcm", "reason": "DICOM SEG not written: no StudyInstanceUID, "
         "SeriesInstanceUID, Modality: a DICOM SEG cannot reference it"}
    ]  # fmt: skip


def test_vertebrae_masks_become_one_segment_per_vertebra(tmp_path):
    import highdicom as hd
    from dicom_fixtures import write_dicom
    from pydicom.uid import generate_uid

    from spineseg.dicom_seg import write_seg

    path = write_dicom(
        tmp_path / "v.dcm", film(80, 40, np.uint16),
        StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), Modality="DX",
    )  # fmt: skip
    labels = np.zeros((80, 40), np.uint8)
    for value in range(1, 5):
        labels[10 + 12 * value : 20 + 12 * value, 10:30] = value
    seg = hd.seg.segread(write_seg(path, labels, "vertebrae", tmp_path / "v_seg.dcm", "soft"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Th8", "Th9", "Th10", "Th11"]
    codes = [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence]
    assert codes == ["T8 vertebra", "T9 vertebra", "T10 vertebra", "T11 vertebra"]
    uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    np.testing.assert_array_equal(
        seg.get_pixels_by_source_instance([uid], combine_segments=True)[0], labels
    )


def test_the_probability_map_is_written_and_a_small_film_is_flagged(tmp_path, run_dir, capsys):
    src = tmp_path / "films"
    src.mkdir()
    cv2.imwrite(str(src / "big.png"), film(150, 70))
    cv2.imwrite(str(src / "tiny.png"), film(40, 30))  # below the 64x64 working resolution
    out = tmp_path / "out"
    assert cli_main([f"run_dir={run_dir}", f"input={src}", f"output={out}", "progress=false"]) == 0
    prob = cv2.imread(str(out / "big_prob.png"), cv2.IMREAD_UNCHANGED)
    assert prob.dtype == np.uint16 and prob.shape == (150, 70)
    expected = load_ensemble(run_dir).predict(cv2.imread(str(src / "big.png"), 0)).probability
    np.testing.assert_allclose(prob / 65535, expected, atol=1 / 65535)
    assert "tiny.png: 40x30 film (HxW) is smaller than the working resolution 64x64" in (
        capsys.readouterr().err
    )
    with open(out / "predictions.csv") as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    assert "smaller than the working resolution" in rows["tiny.png"]["flag"]
    assert "smaller" not in rows["big.png"]["flag"]


@pytest.mark.parametrize(("resize", "preprocess"), [("stretch", "none"), ("letterbox", "clahe")])
def test_training_and_predict_give_a_film_the_identical_tensor(run_dir, resize, preprocess):
    """No train/inference skew: the DataModule's path (prepare + FilmDataset) and predict's
    (`Ensemble.to_input`) share one function, and give bit-identical inputs."""
    from spineseg.data.datamodule import FilmDataset, prepare
    from spineseg.data.sample import Sample
    from spineseg.predict import Ensemble, Pipeline

    image = film(150, 60, np.uint16)
    sample = Sample("a", "p", image, np.zeros(image.shape, np.uint8), binary_label=True)
    prepared = prepare([sample], (64, 64), resize, preprocess)
    trained = FilmDataset(prepared.images, prepared.labels, prepared.ids)[0]["image"]
    loaded = load_ensemble(run_dir)
    ens = Ensemble(loaded.models, loaded.names, Pipeline("region", (64, 64), resize, preprocess))
    predicted, _ = ens.to_input(image)
    assert torch.equal(trained, predicted)


def test_members_of_a_preprocessing_sweep_and_of_both_targets_vote_together(tmp_path) -> None:
    """`-m data.preprocess=clahe,none` and a levels model beside a region model: each member
    sees its own preprocessing of the film, and all vote on the region."""
    from spineseg.data import transforms as T
    from spineseg.data.datamodule import working_film

    run = make_run(tmp_path / "run", members={"m1": {"preprocess": "clahe", "target": "levels"}})
    ens = load_ensemble(run, rule="soft")
    assert ens.variants == ["none", "clahe"] and ens.inputs == [0, 1] and ens.target == "region"
    image = film(90, 70)
    x, _ = ens.to_input(image)
    for channel, variant in enumerate(ens.variants):
        img, _, _ = working_film(image, None, (64, 64), "stretch", variant)
        torch.testing.assert_close(x[channel], T.to_tensor(img))
    probs = ens.model_probs(x[None])
    with torch.inference_mode():
        for k, m in enumerate(ens.models):
            own = m.probabilities(m(x[None, ens.inputs[k] : ens.inputs[k] + 1]))
            torch.testing.assert_close(probs[k], own)
    got = ens.predict(image)
    assert got.labels.shape == image.shape and set(np.unique(got.labels)) <= {0, 1}
    from spineseg.onnx_export import export

    with pytest.raises(ConfigError, match=r"different data\.preprocess"):
        export(run, tmp_path / "e.onnx")


def test_members_on_different_grids_are_refused_naming_the_setting(tmp_path) -> None:
    run = make_run(tmp_path / "run", members={"m1": {"image_size": [96, 64]}})
    with pytest.raises(
        StoreError, match=r"different data\.image_size \(\(64, 64\) vs \(96, 64\)\)"
    ):
        load_ensemble(run)


@pytest.mark.parametrize("value", ["true", "false"])
def test_one_switch_turns_the_progress_bars_of_training_and_predict(value, monkeypatch):
    from spineseg.config import APPS_DIR, compose

    monkeypatch.setenv("SPINESEG_PROGRESS", value)
    predict = compose(["run_dir=r"], "predict", APPS_DIR)
    train = compose(["trainer=cpu"])
    assert predict.progress is train.trainer.enable_progress_bar is (value == "true")
