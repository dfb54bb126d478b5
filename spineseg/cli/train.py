"""`spineseg-train`: a thin Hydra entry point around `spineseg.train.train`."""

from __future__ import annotations

import logging
import signal
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import spineseg  # noqa: F401  (registers the OmegaConf resolvers)
from spineseg.cli.common import hydra_app
from spineseg.errors import (
    DISK_ERRNOS,
    Interrupted,
    SpinesegError,
    os_error_line,
    raise_on_signals,
)

log = logging.getLogger("spineseg.train")


def _quiet_lightning() -> None:
    """Lightning adds its own console handler; under Hydra's logging every line would print
    twice. Its records still reach Hydra's handlers (console and the job's log file)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _train(cfg: DictConfig) -> float | None:
    """One model; the validation Dice is the job's return value (for sweepers that tune)."""
    import lightning  # noqa: F401  (its import adds the handlers removed below)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from spineseg.train import record_failure, train

    _quiet_lightning()
    if _in_sweep():
        # Lightning starts DDP ranks > 0 by re-running sys.argv; in a multirun that would be
        # the whole sweep again. This job's own overrides re-run just this job.
        sys.argv = [sys.argv[0], *HydraConfig.get().overrides.task]
    raise_on_signals()
    try:
        manifest = train(cfg)
    except (Interrupted, SIGTERMException) as caught:
        # SLURM's pre-emption or Ctrl-C: the model is marked, the scheduler sees a non-zero
        # exit, and the same command resumes from the last good checkpoint. Lightning's own
        # SIGTERM path raises a SystemExit without a code, which would exit 0 as if finished.
        stop = caught if isinstance(caught, Interrupted) else Interrupted(signal.SIGTERM)
        record_failure(cfg, stop, status="interrupted")
        print(
            f"error: {cfg.member}: interrupted by {stop}; run the same command again to "
            f"resume from {cfg.job_dir}/checkpoints",
            file=sys.stderr,
        )
        sys.exit(stop.exit_code)
    except Exception as err:
        record_failure(cfg, err)
        disk = isinstance(err, OSError) and err.errno in DISK_ERRNOS
        message = os_error_line(err, cfg.job_dir) if disk else f"{type(err).__name__}: {err}"
        if _in_sweep():
            # One failed model must not sink the sweep: it is recorded and summarised.
            log.error("%s failed: %s", cfg.member, message)
            return None
        if isinstance(err, SpinesegError) or disk:
            print(f"error: {err if not disk else message}", file=sys.stderr)
            sys.exit(1)
        raise
    return (manifest.get("val_metrics") or {}).get("dice")


main = hydra_app("train", _train, "usage: spineseg-train [-m] [model=<preset>] [key=value ...]")


if __name__ == "__main__":
    sys.exit(main())
