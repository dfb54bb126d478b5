"""Shared fixtures. Tests run on the CPU at tiny sizes; nothing touches the network."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("SPINESEG_PROGRESS", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one thread each, for this process and for every
    # command a test starts, so that the workers never compete for a core.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _no_handler_on_a_closed_stream():
    """After every test: drop the handlers left writing to a stream pytest has closed (an
    in-process app configured logging onto its captured stderr), so that no later test's
    one-line error gains a "--- Logging error ---" paragraph, whatever the order of tests."""
    yield
    for lg in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        if isinstance(lg, logging.Logger):
            for handler in lg.handlers[:]:
                if getattr(getattr(handler, "stream", None), "closed", False):
                    lg.removeHandler(handler)


@pytest.fixture
def restore_logging():
    """An in-process Hydra app configures logging onto pytest's captured streams; put every
    logger back so that later tests never write to a closed stream."""
    loggers = [logging.getLogger(), *[lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger)]]  # fmt: skip
    saved = {lg: (lg.handlers[:], lg.level, lg.disabled, lg.propagate) for lg in loggers}
    yield
    for lg in logging.root.manager.loggerDict.values():
        if isinstance(lg, logging.Logger) and lg not in saved:
            lg.handlers.clear()
    for lg, (handlers, level, disabled, propagate) in saved.items():
        lg.handlers[:], lg.disabled, lg.propagate = handlers, disabled, propagate
        lg.setLevel(level)


@pytest.fixture
def compose_train():
    """Compose conf/train.yaml with overrides, as `spineseg-train` would."""
    from hydra import compose, initialize_config_dir

    import spineseg  # noqa: F401  (resolvers)

    def _compose(*overrides: str, hydra_cfg: bool = False):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)

    return _compose
