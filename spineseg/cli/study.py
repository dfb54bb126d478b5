"""`spineseg-study`: the paper's whole protocol in one command (`make demo`,
`make reproduce-paper`).

  a) augmentation off vs on, one reference model      -> <run_dir>/ablation/augment-<v>/
  b) the model sweep (Hydra multirun, any launcher)    -> <run_dir>/predictions/
  c) top-k selection on validation  d) every rule on test and external -> <run_dir>/ensemble/
  e) the report                                        -> <run_dir>/report/

Each step is the CLI a user would run, in a subprocess, and each skips what is already
complete, so re-running the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import spineseg  # noqa: F401
from spineseg.cli.common import CONF_DIR
from spineseg.errors import SpinesegError

log = logging.getLogger("spineseg.study")


def _compose(overrides: list[str]) -> DictConfig:
    """The study's config, or one line saying which override Hydra could not apply."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise SpinesegError(" ".join(str(err).split())) from None


def _run(step: str, cmd: list[str]) -> int:
    print(f"\n=== {step}\n$ {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    code = subprocess.call(cmd)
    print(f"=== {step}: exit {code} after {time.monotonic() - start:.0f}s", flush=True)
    return code


def study(overrides: list[str]) -> Path:
    cfg = _compose(overrides)
    run_dir = Path(cfg.run_dir)
    train = [sys.executable, "-m", "spineseg.cli.train"]
    passthrough = [o for o in overrides if not o.startswith(("run_dir=", "model="))]

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

    sweep_models = (cfg.hydra.sweeper.get("params") or {}).get("model")
    sweep = [] if sweep_models else [f"model={cfg.model.name}"]
    code = _run(
        "b-d) sweep, selection on validation, every rule", [*train, "-m", *overrides, *sweep]
    )
    if code:
        raise SpinesegError(f"the sweep exited with {code}; see {run_dir}/jobs/*/train.log")
    if not (run_dir / "ensemble" / "results.csv").exists() and cfg.ensemble.enabled:
        ens = [o for o in overrides if o.startswith("ensemble.")]
        if _run(
            "c-d) ensemble",
            [sys.executable, "-m", "spineseg.cli.ensemble", f"run_dir={run_dir}", *ens],
        ):
            raise SpinesegError(f"the ensemble failed on {run_dir}")

    from spineseg.report.report import build_report

    report = build_report(run_dir)
    results = run_dir / "ensemble" / "results.md"
    if results.exists():
        print("\n" + results.read_text())
    print(f"report: {report}\nrun directory: {run_dir}", flush=True)
    return report


def show_config(overrides: list[str], what: str) -> None:
    """`--cfg job|hydra|all`, as the Hydra apps have it: the composed config, nothing run."""
    from omegaconf import OmegaConf

    cfg = _compose(overrides)
    if what == "job":
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    elif what == "hydra":
        cfg = cfg.hydra
    print(OmegaConf.to_yaml(cfg))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--cfg" in args or "-c" in args:
            at = args.index("--cfg" if "--cfg" in args else "-c")
            what = args[at + 1] if at + 1 < len(args) else "job"
            if what not in ("job", "hydra", "all"):
                raise SpinesegError(f"unknown --cfg {what!r}; valid choices: all, hydra, job")
            show_config(args[:at] + args[at + 2 :], what)
            return
        study(args)
    except SpinesegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
