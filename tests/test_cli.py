"""Every entry point is a Hydra app over its own config: `--help`, `--cfg job`, a bad
override and a missing required option behave the same everywhere."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
#: Entry points with an option that has no default (`???`, or run_dir for predict).
REQUIRED = {
    "spineseg-ensemble": "run_dir",
    "spineseg-predict": "run_dir",
    "spineseg-report": "run_dir",
    "spineseg-export": "run_dir",
    "spineseg-score": "run_dir",
}


pytestmark = pytest.mark.usefixtures("restore_logging")


def _main(script: str):
    module, name = SCRIPTS[script].split(":")
    return getattr(importlib.import_module(module), name)


def _run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = _main(script)(argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return int(code or 0), out.out, out.err


def test_every_entry_point_is_named_main() -> None:
    assert {target.split(":")[1] for target in SCRIPTS.values()} == {"main"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_and_cfg_job_compose_without_running(script: str, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Hydra writes nothing here: each app sets output_subdir null
    code, out, _ = _run(script, ["--help"], capsys)
    assert code == 0 and out.startswith(f"usage: {script}")
    code, out, _ = _run(script, ["--cfg", "job"], capsys)
    assert code == 0 and out.strip()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_bad_override_is_one_line_naming_it(script: str, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(script, ["no_such_option=1"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "no_such_option" in lines[0]
    assert "valid keys:" in lines[0]


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_a_missing_required_option_is_one_line(script: str, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(script, [], capsys)
    assert code == 1 and err.strip().count("\n") == 0
    assert err.startswith(f"error: {REQUIRED[script]} is required; usage: {script}")


def test_an_unknown_preset_is_one_line_with_the_choices(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run("spineseg-validate-data", ["data=no_such_preset"], capsys)
    assert code == 1 and err.strip().count("\n") == 0
    assert "Could not find 'data/no_such_preset'; valid choices: aasce, " in err


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("study.stage1=[model=unet_lite0]", "cannot parse the override 'study.stage1=[model="),
        ("sweep=null", "~sweep drops it"),
    ],
)
def test_an_override_hydra_cannot_read_is_one_line(override, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run("spineseg-study", [override], capsys)
    assert code == 1 and err.strip().count("\n") == 0, err
    assert err.startswith("error: ") and says in err


@pytest.mark.parametrize(
    ("sweep", "says"),
    [
        (["model=unet_lite0,fpn_lite0", "trainer.max_epoch=3"], "Key 'max_epoch' is not in struct"),
        (["model=unet_lite0,nope"], "Could not find 'model/nope'; valid choices: "),
        (["model=unet_lite0", "data.resize=stretch,sideways"], "data.resize"),
    ],
)
def test_a_bad_key_or_value_anywhere_in_a_sweep_is_one_line_before_it_starts(
    sweep, says, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run("spineseg-train", ["-m", "experiment=tiny", *sweep], capsys)
    assert code == 1 and err.strip().count("\n") == 0, err
    assert err.startswith("error: ") and says in err
    assert not (tmp_path / "outputs").exists()  # no job started


def test_sweep_probes_hold_every_swept_value_once() -> None:
    from spineseg.cli.common import sweep_probes

    probes = sweep_probes(["lr=interval(0,1)", "model=a,b,c", "seed=range(1,3)", "x=[1,2]"])
    assert probes == [
        ["model=a", "seed=1", "x=[1,2]"],
        ["model=b", "seed=1", "x=[1,2]"],
        ["model=c", "seed=1", "x=[1,2]"],
        ["model=a", "seed=2", "x=[1,2]"],
    ]


def test_a_bad_override_beside_cfg_job_or_help_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run("spineseg-train", ["trainer.max_epoch=3", "--cfg", "job"], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "max_epoch" in err, err
    code, out, _ = _run("spineseg-train", ["trainer.max_epochs=3", "--cfg", "job"], capsys)
    assert code == 0 and "max_epochs: 3" in out
    code, _, err = _run("spineseg-train", ["no_such_option=1", "--help"], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "no_such_option" in err, err
    code, out, _ = _run("spineseg-train", ["--help"], capsys)
    assert code == 0 and out.startswith("usage: spineseg-train")


@pytest.mark.parametrize(
    ("override", "says"),
    [
        # a key one level down lists that level's keys and where the name does live
        ("module.lr=1e-4", "valid keys of module: _target_, name, "),
        ("module.lr=1e-4", "(did you mean module.optimizer.lr?)"),
        ("trainer.max_epoch=3", "(did you mean trainer.max_epochs?)"),
        # a config group's preset set as if it were a key
        ("callbacks.early_stopping.patience=3", "(callbacks=early_stopping picks that preset)"),
    ],
)
def test_an_unknown_nested_key_names_its_node_and_the_likely_key(
    override, says, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run("spineseg-train", ["experiment=tiny", override], capsys)
    assert code == 1 and err.strip().count("\n") == 0, err
    assert says in err
    assert "valid keys: name, run" not in err  # not the top level's keys


def test_a_trainer_setting_lightning_refuses_is_one_line_naming_the_node(tmp_path):
    from hydra import compose, initialize_config_dir

    from spineseg.errors import ConfigError
    from spineseg.train import build_trainer

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.precision=17", "logger=none",
                                          f"paths.output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^trainer \(lightning.Trainer\) refused its settings: "
                       r"ValueError: Precision 17 is invalid") as caught:  # fmt: skip
        build_trainer(cfg)
    assert "\n" not in str(caught.value)
