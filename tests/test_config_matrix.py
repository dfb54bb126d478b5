"""Every advertised configuration composes and builds: experiment x trainer x launcher in
full, every other group's presets against every experiment, and each of the 40 model
presets once. DataModule, LightningModule, Trainer and launcher are constructed; nothing is
fitted, and nothing is downloaded (hub presets are built with weights=None)."""

from __future__ import annotations

import itertools
from pathlib import Path

import hydra.utils
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import spineseg  # noqa: F401  (resolvers)
from spineseg.config import construct
from spineseg.train import build_module, build_trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


EXPERIMENTS = [None, *_names("experiment")]
TRAINERS = _names("trainer")
LAUNCHERS = ["basic", "joblib", *_names("hydra/launcher"), "submitit_slurm"]
OTHER_GROUPS = {g: _names(g) for g in ("data", "logger", "callbacks", "sweep")}
#: Data presets that need a dataset folder: given one so the config is complete.
ROOTS = {"folder": "data.root=/datasets/mine"}


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _overrides(experiment: str | None, **groups: str) -> list[str]:
    out = [] if experiment is None else [f"experiment={experiment}"]
    for group, value in groups.items():
        out.append(f"hydra/launcher={value}" if group == "launcher" else f"{group}={value}")
        if value in ROOTS and group == "data":
            out.append(ROOTS[value])
    if groups.get("trainer") in ("gpu", "ddp") and not torch.cuda.is_available():
        out.append("trainer.accelerator=cpu")  # the rest of the GPU preset is built as it is
    return out


def _build(cfg, tmp_path: Path, with_module: bool = False) -> None:
    """Construct what a job constructs, short of fitting; the configs must resolve fully."""
    HydraConfig.instance().set_config(cfg)
    job = {k: v for k, v in cfg.items() if k != "hydra"}
    OmegaConf.to_container(OmegaConf.create(job), resolve=True, throw_on_missing=True)
    OmegaConf.to_container(cfg.hydra.launcher, resolve=True, throw_on_missing=True)
    construct(cfg.data, run_dir=str(tmp_path))
    if with_module:
        build_module(cfg, pretrained=False)
    build_trainer(cfg)
    launcher = dict(cfg.hydra.launcher)
    assert hydra.utils.get_class(launcher["_target_"])


def test_every_experiment_trainer_and_launcher_combination_builds(tmp_path: Path) -> None:
    combos = list(itertools.product(EXPERIMENTS, TRAINERS, LAUNCHERS))
    assert len(combos) >= 4 * 3 * 5
    for experiment, trainer, launcher in combos:
        overrides = _overrides(experiment, trainer=trainer, launcher=launcher)
        try:
            _build(_compose(overrides), tmp_path)
        except Exception as err:  # name the combination that broke
            raise AssertionError(f"{overrides}: {type(err).__name__}: {err}") from err


@pytest.mark.parametrize("group", list(OTHER_GROUPS))
def test_every_preset_of_the_other_groups_builds_with_every_experiment(
    group: str, tmp_path: Path
) -> None:
    for experiment, value in itertools.product(EXPERIMENTS, OTHER_GROUPS[group]):
        overrides = _overrides(experiment, **{group: value})
        try:
            cfg = _compose(overrides)
            _build(cfg, tmp_path)
            if group == "sweep":  # the sweep's models are presets that exist
                params = cfg.hydra.sweeper.params
                for model in str(params.model).split(","):
                    assert (CONF / "model" / f"{model.strip()}.yaml").is_file(), model
        except Exception as err:
            raise AssertionError(f"{overrides}: {type(err).__name__}: {err}") from err


def test_every_model_preset_builds_its_network(tmp_path: Path) -> None:
    for model in _names("model"):
        cfg = _compose([f"model={model}", "experiment=tiny"])
        try:
            _build(cfg, tmp_path, with_module=True)
        except Exception as err:
            raise AssertionError(f"model={model}: {type(err).__name__}: {err}") from err


def test_every_data_and_module_key_has_its_default_in_the_base_file() -> None:
    """A key the record of a stored model lacks counts as unchanged only at its base default
    (`spineseg.identity.identity_changes`): a preset or experiment may set a key, never introduce one."""
    import yaml

    from spineseg.config import group

    bases = {"data": set(group("data/_base")), "module": set(group("module/default"))}
    for path in sorted((CONF / "data").glob("*.yaml")):
        assert set(yaml.safe_load(path.read_text())) - {"defaults"} <= bases["data"], path.name
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        for section, keys in bases.items():
            assert set(spec.get(section) or {}) <= keys, f"{path.name}: {section}"
