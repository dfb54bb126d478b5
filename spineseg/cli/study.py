"""`spineseg-study`: the paper's whole protocol in one command (`make demo`,
`make reproduce-paper`).

  0) a cascade's stage 1 (`study.stage1`), trained and selected on validation first
                                                       -> data.crop.stage1
  a) augmentation off vs on, one reference model      -> <run_dir>/ablation/augment-<v>/
  b) the model sweep (Hydra multirun, any launcher)    -> <run_dir>/predictions/
  c) top-k selection on validation  d) every rule on test and external -> <run_dir>/ensemble/
  d') `study.film_scores`: predict's output at the films' resolution -> <run_dir>/film_scores/
  e) the report                                        -> <run_dir>/report/

Each step is the CLI a user would run, in a subprocess, and each skips what is already
complete, so re-running the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

import spineseg  # noqa: F401
from spineseg.cli.common import hydra_app
from spineseg.errors import ConfigError, SpinesegError
from spineseg.names import ENSEMBLE_DIR, SELECTION, STORED_SPLITS

log = logging.getLogger("spineseg.study")


def _run(step: str, cmd: list[str]) -> int:
    print(f"\n=== {step}\n$ {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    code = subprocess.call(cmd)
    print(f"=== {step}: exit {code} after {time.monotonic() - start:.0f}s", flush=True)
    return code


def _stage1(cfg: DictConfig, train: list[str], passthrough: list[str]) -> None:
    """A cascade's stage 1: this command with `study.stage1`'s overrides, into
    `data.crop.stage1`, selected on validation only (the test split is read once, by
    stage 2). A finished stage 1 is kept as it is."""
    crop = cfg.data.get("crop")
    if not crop or not crop.get("stage1"):
        raise ConfigError(
            "study.stage1 is set but data.crop.stage1 is not: study.stage1 trains a cascade's "
            "stage 1 into data.crop.stage1 (set both, or study.stage1=null)"
        )
    extra = cfg.study.stage1
    if not isinstance(extra, ListConfig) or not all(isinstance(o, str) for o in extra):
        raise ConfigError(
            f"study.stage1={extra!r} must be a list of overrides, e.g. "
            '\'study.stage1=["data.image_size=[384,160]","model=unet_lite0"]\''
        )
    extra = list(extra)
    stage1 = Path(str(crop.stage1))
    if (stage1 / SELECTION).is_file():
        log.info("stage 1 %s is finished: kept", stage1)
        return
    sweeps = (HydraConfig.get().sweeper.get("params") or {}).get("model")
    model = (
        [] if sweeps or any(o.startswith("model=") for o in extra) else [f"model={cfg.model.name}"]
    )
    cmd = [*train, "-m", *passthrough, *model, *extra, "data.crop=null", f"run_dir={stage1}",
           "ensemble.enabled=true", "ensemble.splits=[val]"]  # fmt: skip
    if _run("0) cascade stage 1 (selected on validation)", cmd):
        raise SpinesegError(f"stage 1 failed; its models' logs are {stage1}/jobs/*/train.log")
    if not (stage1 / SELECTION).is_file():
        raise SpinesegError(f"stage 1 finished without {stage1 / SELECTION}")


def _film_splits(cfg: DictConfig) -> list[str]:
    """`study.film_scores`, checked before anything trains."""
    value = cfg.study.get("film_scores") or []
    if not isinstance(value, ListConfig | list) or any(s not in STORED_SPLITS for s in value):
        raise ConfigError(
            f"study.film_scores={value!r} must be a list of splits among "
            f"{', '.join(STORED_SPLITS)}, e.g. 'study.film_scores=[val,test]'"
        )
    return [str(s) for s in value]


def _film_scores(run_dir: Path, splits: list[str]) -> None:
    """The ensemble's output at the films' resolution (`spineseg-score`), for each split the
    store holds; a set already scored for this very selection is kept."""
    from spineseg.ensemble.store import PredictionStore
    from spineseg.report.film_scores import film_scores_dir, scored_for

    current = json.loads((run_dir / SELECTION).read_text()).get("set_id")
    store = PredictionStore(run_dir)
    for split in splits:
        if scored_for(run_dir, split, current):
            log.info("%s is scored for this selection: kept", film_scores_dir(run_dir, split))
            continue
        if not store.has_truth(split):
            log.warning("study.film_scores: the store has no %s split; skipped", split)
            continue
        cmd = [sys.executable, "-m", "spineseg.cli.score", f"run_dir={run_dir}", f"split={split}"]
        if _run(f"d') {split} at the films' resolution", cmd):
            raise SpinesegError(f"spineseg-score failed on the {split} split of {run_dir}")


def study(cfg: DictConfig) -> Path:
    overrides = list(HydraConfig.get().overrides.task)
    run_dir = Path(cfg.run_dir)
    train = [sys.executable, "-m", "spineseg.cli.train"]
    passthrough = [o for o in overrides if not o.startswith(("run_dir=", "model="))]
    film_splits = _film_splits(cfg)

    if cfg.study.get("stage1") is not None:
        _stage1(cfg, train, passthrough)
    if cfg.study.augment_ablation:
        for value in cfg.study.augment_values:
            code = _run(
                f"a) augmentation={value}, {cfg.study.reference_model}",
                [
                    *train,
                    *passthrough,
                    f"model={cfg.study.reference_model}",
                    f"data.augment={value}",
                    f"run_dir={run_dir}/ablation/augment-{value}",
                ],
            )
            if code:
                log.warning("augmentation run %s failed; the report will say so", value)

    sweep_models = (HydraConfig.get().sweeper.get("params") or {}).get("model")
    sweep = [] if sweep_models else [f"model={cfg.model.name}"]
    code = _run(
        "b-d) sweep, selection on validation, every rule", [*train, "-m", *overrides, *sweep]
    )
    if code:
        logs = (
            f"; the models' logs are {run_dir}/jobs/*/train.log"
            if any(run_dir.glob("jobs/*/train.log"))
            else ""
        )
        raise SpinesegError(f"the sweep exited with {code} (its last line says why){logs}")
    if not (run_dir / ENSEMBLE_DIR / "results.csv").exists() and cfg.ensemble.enabled:
        ens = [o for o in overrides if o.startswith("ensemble.")]
        if _run(
            "c-d) ensemble",
            [sys.executable, "-m", "spineseg.cli.ensemble", f"run_dir={run_dir}", *ens],
        ):
            raise SpinesegError(f"the ensemble failed on {run_dir}")
    if film_splits and (run_dir / SELECTION).is_file():
        _film_scores(run_dir, film_splits)

    from spineseg.report.report import build_report

    report = build_report(run_dir)
    results = run_dir / ENSEMBLE_DIR / "results.md"
    if results.exists():
        print("\n" + results.read_text())
    print(f"report: {report}\nrun directory: {run_dir}", flush=True)
    return report


main = hydra_app("study", study, "usage: spineseg-study [experiment=<preset>] [key=value ...]")


if __name__ == "__main__":
    sys.exit(main())
