"""The streaming evaluator end to end on tiny stores, the callbacks and W&B logging."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from ensemble_fixtures import blob_masks, make_store, write_manifest
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from spineseg.ensemble import metrics, voting
from spineseg.ensemble.callbacks import EnsembleCallback
from spineseg.ensemble.evaluate import (
    RESULT_COLUMNS,
    EnsembleSpec,
    ensemble_config,
    evaluate_arrays,
    run_ensemble,
)
from spineseg.ensemble.hydra_callback import EnsembleOnMultirunEnd
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import ConfigError, StoreError
from spineseg.names import BEST

RULES = ["soft", "hard", "weighted", "max", "median", "staple", "logit_mean"]
FAST = {"n_boot": 50, "gallery_n": 2, "top_k": 2}


def _methods(models: list[str], post: tuple[str, ...] = ("spine",)) -> list[str]:
    """Report order: best single, rules, their post-processed variants, then the models."""
    head = [BEST, *RULES]
    return [*head, *[f"{m}+{p}" for p in post for m in head], *[f"model:{m}" for m in models]]


def test_end_to_end_region(tmp_path):
    make_store(tmp_path, models=("m0", "m1", "m2", "m3"), noise=[1.5, 2.0, 2.5, 6.0])
    results = run_ensemble(tmp_path, {**FAST, "top_k": 3})
    out = tmp_path / "ensemble"
    selected = json.loads((out / "selection.json").read_text())["models"]
    assert selected == ["m0", "m1", "m2"]

    csv = pd.read_csv(out / "results.csv")
    assert set(RESULT_COLUMNS) <= set(csv.columns)
    for split, n in (("test", 5), ("external", 3)):
        part = csv[csv["split"] == split]
        assert part["method"].tolist() == _methods(selected)  # rules before models
        assert (part.loc[part["method"].isin(RULES), "k"] == 3).all()
        assert (part.loc[part["method"] == "soft+spine", "k"] == 3).all()
        best = part[part["method"] == BEST].iloc[0]
        assert best["rel_improvement_pct"] == 0 and np.isnan(best["p_value_vs_best_single"])
        assert part["dice_ci_low"].le(part["dice_mean"] + 1e-12).all()
        assert part["dice_ci_high"].ge(part["dice_mean"] - 1e-12).all()
        assert (part["distance_unit"] == "mm").all() and (part["n"] == n).all()
    pd.testing.assert_frame_equal(
        results.reset_index(drop=True), csv, check_dtype=False, check_exact=False, rtol=1e-9
    )

    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == len(_methods(selected)) * (5 + 3)
    assert per_image.groupby(["split", "method"]).size().loc["test"].eq(5).all()

    # the paired difference is the mean of the per-film differences, its CI around it
    soft = per_image[(per_image["split"] == "test") & (per_image["method"] == "soft")]
    best = per_image[(per_image["split"] == "test") & (per_image["method"] == BEST)]
    diff = soft.set_index("id")["dice"] - best.set_index("id")["dice"]
    row = csv[(csv["split"] == "test") & (csv["method"] == "soft")].iloc[0]
    assert row["dice_diff_vs_best"] == pytest.approx(diff.mean())
    assert row["dice_diff_ci_low"] <= row["dice_diff_vs_best"] <= row["dice_diff_ci_high"]

    # best_single is the top validation model, and its rows are that model's rows
    b = per_image[per_image["method"] == BEST].reset_index(drop=True)
    m = per_image[per_image["method"] == "model:m0"].reset_index(drop=True)
    np.testing.assert_array_equal(b["dice"], m["dice"])

    data = json.loads((out / "results.json").read_text())
    assert data["distance_unit"] == {"test": "mm", "external": "mm"}
    assert "±" in (out / "results.md").read_text()
    for name in (
        "dice_bars_test",
        "dice_box_test",
        "gallery_test",
        "dice_bars_external",
        "gallery_external",
    ):
        path = out / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*.tmp"))


def test_soft_vote_dice_matches_a_direct_computation(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"), sizes={"val": 3, "test": 4})
    run_ensemble(tmp_path, {**FAST, "figures": False, "distances": False, "rules": ["soft"]})
    per_image = pd.read_csv(tmp_path / "ensemble" / "per_image.csv")
    probs = torch.stack(
        [torch.from_numpy(np.asarray(store.probs(m, "test"), np.float32)) for m in ("m0", "m1")]
    )
    labels = (probs.mean(0)[:, 0] > 0.5).numpy()
    truth = np.asarray(store.truth("test").masks).astype(bool)
    inter = (labels & truth).sum((1, 2))
    direct = 2 * inter / (labels.sum((1, 2)) + truth.sum((1, 2)))
    got = per_image[per_image["method"] == "soft"]["dice"].to_numpy()
    np.testing.assert_allclose(got, direct, atol=1e-6)
    assert per_image["hd95"].isna().all()  # distances off


def test_vertebrae_mode(tmp_path):
    make_store(tmp_path, models=("m0", "m1", "m2"), channels=5, spacing=None)
    results = run_ensemble(tmp_path, {**FAST, "top_k": 2, "splits": ["test"]})
    assert set(results["split"]) == {"test"}
    assert results["method"].tolist() == _methods(["m0", "m1"])
    assert results["dice_mean"].between(0, 1).all()
    assert (results["distance_unit"] == "px").all()
    assert (tmp_path / "ensemble" / "figures" / "gallery_test.png").exists()


def test_chunking_does_not_change_the_numbers(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1", "m2"), sizes={"test": 6})
    data = store.open_split(["m0", "m1", "m2"], "test")
    spec = EnsembleSpec(["m0", "m1", "m2"], [0.5, 0.3, 0.2], RULES, dict.fromkeys(RULES, 0.5), "m1")
    args = (
        [data.probs[m] for m in spec.models],
        data.truth.masks,
        data.truth.ids,
        spec,
        data.truth.distance_spacing,
    )
    one = evaluate_arrays("test", *args, chunk_size=6)
    many = evaluate_arrays("test", *args, chunk_size=4)
    pd.testing.assert_frame_equal(one, many)
    in_memory = [np.array(a) for a in args[0]]
    pd.testing.assert_frame_equal(one, evaluate_arrays("test", in_memory, *args[1:], chunk_size=2))


def test_missing_external_is_skipped_and_failed_models_excluded(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1", "m2"), sizes={"val": 3, "test": 3})
    write_manifest(store, "m2", status="failed", splits=["val"], error="CUDA OOM")
    with pytest.warns(UserWarning, match=r"'m2' excluded: status 'failed' \(CUDA OOM\)"):
        results = run_ensemble(tmp_path, FAST)
    assert set(results["split"]) == {"test"}
    assert "model:m2" not in set(results["method"])


def test_a_model_lacking_a_split_skips_that_split(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"), sizes={"val": 3, "test": 3, "external": 2})
    store.probs_path("m1", "external").unlink()
    write_manifest(store, "m1", splits=["val", "test"])
    with pytest.warns(UserWarning, match="'external' is missing for selected model"):
        results = run_ensemble(tmp_path, {**FAST, "figures": False})
    assert set(results["split"]) == {"test"}


def test_nan_in_a_test_chunk_is_reported(tmp_path):
    store = make_store(tmp_path, models=("m0", "m1"), sizes={"val": 3, "test": 5})
    bad = np.array(store.probs("m1", "test"))
    bad[4] = np.nan
    np.savez(store.probs_path("m1", "test"), probs=bad, ids=store.ids("m1", "test"))
    with pytest.raises(StoreError, match=r"'m1' split 'test' image 'test-004'"):
        run_ensemble(tmp_path, {**FAST, "chunk_size": 2, "figures": False})


def test_no_complete_model_is_an_error(tmp_path):
    store = make_store(tmp_path, models=("m0",), sizes={"val": 2})
    write_manifest(store, "m0", status="running", splits=["val"])
    with pytest.raises(StoreError, match="no complete model"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_ensemble(tmp_path, FAST)
    with pytest.raises(StoreError, match="does not exist"):
        run_ensemble(tmp_path / "nowhere", FAST)


def test_config_is_validated():
    assert ensemble_config(None)["top_k"] == 10
    assert ensemble_config(OmegaConf.create({"top_k": 3}))["top_k"] == 3
    with pytest.raises(ConfigError, match="valid choices"):
        ensemble_config({"rules": ["soft", "mean"]})
    with pytest.raises(ConfigError, match="valid choices"):
        ensemble_config({"topk": 3})
    with pytest.raises(ConfigError, match="chunk_size"):
        ensemble_config({"chunk_size": 0})
    with pytest.raises(ConfigError, match=r"ensemble\.tta 'rot'; valid choices: flip, none, val$"):
        ensemble_config({"tta": "rot"})  # val, the default, is among the choices


def test_greedy_and_tuned_thresholds_end_to_end(tmp_path):
    make_store(tmp_path, models=("m0", "m1", "m2"))
    results = run_ensemble(
        tmp_path,
        {
            **FAST,
            "selection": "greedy",
            "greedy_size": 4,
            "tune_threshold": True,
            "figures": False,
            "rules": ["soft", "weighted"],
        },
    )
    sel = json.loads((tmp_path / "ensemble" / "selection.json").read_text())
    assert sel["method"] == "greedy" and sum(sel["multiplicities"].values()) >= 1
    rows = results[results["method"].isin(["soft", "weighted"])]
    assert set(rows["threshold"]) <= {sel["thresholds"]["soft"], sel["thresholds"]["weighted"]}


# ---------------------------------------------------------------------- Hydra callback
def test_hydra_callback_runs_and_a_failure_exits_non_zero(tmp_path, capsys):
    make_store(tmp_path, models=("m0", "m1"), sizes={"val": 3, "test": 3})
    cfg = OmegaConf.create(
        {
            "hydra": {"sweep": {"dir": str(tmp_path)}},
            "ensemble": {**FAST, "figures": False, "top_k": 2},
        }
    )
    EnsembleOnMultirunEnd().on_multirun_end(cfg)
    assert (tmp_path / "ensemble" / "results.csv").exists()

    cfg.hydra.sweep.dir = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as stop:  # one line, and the sweep exits 1
        EnsembleOnMultirunEnd().on_multirun_end(cfg)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and err.count("\n") == 0
    assert "ensemble of" in err and "does not exist" in err and "spineseg-ensemble run_dir=" in err

    failed = tmp_path / "failed"  # no model finished: the last line says why they failed
    for name, error in (("m0", "ConfigError: lr"), ("m1", "ConfigError: lr")):
        PredictionStore(failed).write_manifest(name, {"status": "failed", "error": error})
    cfg.hydra.sweep.dir = str(failed)
    with pytest.raises(SystemExit) as stop:
        EnsembleOnMultirunEnd().on_multirun_end(cfg)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and err == (
        f"error: none of the 2 model(s) of {failed} finished, so there is nothing to ensemble: "
        "ConfigError: lr"
    )

    cfg.ensemble.enabled = False
    (tmp_path / "ensemble" / "results.csv").unlink()
    cfg.hydra.sweep.dir = str(tmp_path)
    EnsembleOnMultirunEnd().on_multirun_end(cfg)
    assert not (tmp_path / "ensemble" / "results.csv").exists()


# ---------------------------------------------------------------------- Lightning callback
class _Blobs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, prefix: str) -> None:
        rng = np.random.default_rng(seed)
        self.masks = blob_masks(n, (32, 32), rng)
        self.images = self.masks + 0.3 * rng.standard_normal(self.masks.shape)
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.tensor(self.images[i][None], dtype=torch.float32),
            "mask": torch.tensor(self.masks[i], dtype=torch.long),
            "id": f"{self.prefix}{i}",
        }


class _Conv(L.LightningModule):
    """A 1x1 convolution: a real (tiny) segmentation model with the store contract."""

    def __init__(self, name: str, scale: float) -> None:
        super().__init__()
        self.model_name = name
        self.net = torch.nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.net.weight.fill_(scale)
            self.net.bias.fill_(-scale / 2)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        probs = torch.sigmoid(self.net(batch["image"]))
        return {"probs": probs, "target": batch["mask"], "ids": list(batch["id"])}


def test_lightning_callback_collects_models(tmp_path):
    loaders = [
        torch.utils.data.DataLoader(_Blobs(5, 0, "t"), batch_size=2),
        torch.utils.data.DataLoader(_Blobs(3, 1, "e"), batch_size=2),
    ]
    callback = EnsembleCallback(rules=["soft", "hard", "max"], n_boot=50, verbose=False)
    csv_logger = CSVLogger(tmp_path, name="logs", version=0)
    for name, scale, logger in (("a", 8.0, False), ("b", 3.0, csv_logger)):
        trainer = L.Trainer(
            accelerator="cpu",
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
            default_root_dir=tmp_path,
        )
        trainer.test(_Conv(name, scale), dataloaders=loaders, verbose=False)
        assert callback.results is not None
    assert callback.models == ["a", "b"]
    res = callback.results
    assert set(res["split"]) == {"test", "external"}
    assert res[res["split"] == "test"]["method"].tolist() == [
        BEST,
        "soft",
        "hard",
        "max",
        "model:a",
        "model:b",
    ]
    assert (res.loc[res["method"] == "soft", "k"] == 2).all()
    # model a's Dice recomputed directly from its own probabilities
    ds = _Blobs(5, 0, "t")
    probs = torch.sigmoid(
        _Conv("a", 8.0).net(torch.tensor(ds.images[:, None], dtype=torch.float32))
    )
    direct = metrics.overlap_metrics(
        voting.to_labels(probs.detach()), torch.from_numpy(ds.masks.astype(np.int64)), 2
    )["dice"]
    got = res[(res["split"] == "test") & (res["method"] == "model:a")]["dice_mean"].iloc[0]
    assert np.isclose(got, np.mean(direct), atol=1e-3)
    logged = pd.read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    assert "ensemble/test/soft/dice" in logged.columns  # the second run had a logger
    assert np.isclose(
        logged["ensemble/test/soft/dice"].dropna().iloc[-1],
        res[(res["split"] == "test") & (res["method"] == "soft")]["dice_mean"].iloc[0],
    )


# ---------------------------------------------------------------------- W&B
def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_store(tmp_path, models=("m0", "m1"), sizes={"val": 2, "test": 2})
    run_ensemble(tmp_path, {**FAST, "distances": False, "wandb": {"enabled": True, "group": "g"}})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


def test_python_repeats_no_default_that_a_config_sets():
    """conf/ is the one source: the DataModule and the LightningModule take no default for a
    key their YAML sets, and the ensemble's Python entry points read conf/ensemble."""
    import inspect

    from spineseg.data.datamodule import SpineDataModule
    from spineseg.ensemble.evaluate import DEFAULTS
    from spineseg.ensemble.selection import select_models
    from spineseg.models.module import SegmentationModule

    conf = Path(__file__).resolve().parents[1] / "conf"
    for cls, yaml in (
        (SpineDataModule, conf / "data" / "_base.yaml"),
        (SegmentationModule, conf / "module" / "default.yaml"),
    ):
        keys = set(OmegaConf.load(yaml)) - {"_target_"}
        params = inspect.signature(cls.__init__).parameters
        assert keys <= set(params), (cls.__name__, keys - set(params))
        repeated = [k for k in keys if params[k].default is not inspect.Parameter.empty]
        assert not repeated, f"{cls.__name__} repeats the YAML's defaults of {repeated}"
    yaml = OmegaConf.to_container(OmegaConf.load(conf / "ensemble" / "default.yaml"))
    assert yaml == DEFAULTS
    sig = inspect.signature(select_models).parameters
    assert (sig["k"].default, sig["chunk_size"].default) == (yaml["top_k"], yaml["chunk_size"])


def test_the_lightning_callback_is_configured_with_the_ensemble_settings(tmp_path):
    """`callbacks=ensemble` adds the in-process ensemble with the ensemble's own settings
    (one source: conf/ensemble), beside checkpointing."""
    from hydra import compose, initialize_config_dir

    from spineseg.train import build_trainer

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["callbacks=ensemble", "ensemble.n_boot=123",
                                          f"paths.output_dir={tmp_path}", "logger=none"])  # fmt: skip
    trainer = build_trainer(cfg)
    cb = next(c for c in trainer.callbacks if isinstance(c, EnsembleCallback))
    assert cb.n_boot == 123 and cb.rules == list(cfg.ensemble.rules)
    from spineseg.ensemble.evaluate import DEFAULTS

    assert EnsembleCallback().n_boot == DEFAULTS["n_boot"]  # unset: the ensemble's default


def test_swept_members_whose_names_hold_the_separator_keep_their_best_single(tmp_path):
    """`-m data.preprocess=clahe,hist_eq` names its members `unet_lite0+data.preprocess=...`:
    the best of them is still listed as best_single, with and without post-processing."""
    names = ("unet_lite0+data.preprocess=clahe", "unet_lite0+data.preprocess=hist_eq")
    make_store(tmp_path, models=names, noise=[1.5, 2.5])
    run_ensemble(tmp_path, {**FAST, "top_k": 2})
    csv = pd.read_csv(tmp_path / "ensemble" / "results.csv")
    test = csv[csv["split"] == "test"].set_index("method")
    assert {BEST, f"{BEST}+spine", f"model:{names[0]}"} <= set(test.index)
    assert test.loc[BEST, "dice_mean"] == test.loc[f"model:{names[0]}", "dice_mean"]
    assert np.isfinite(test.loc["soft", "rel_improvement_pct"])
    assert np.isfinite(test.loc["soft", "dice_diff_vs_best"])
