"""W&B that is private by default: offline unless the user opts in, never a prompt."""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def wandb_mode() -> str:
    """`offline` unless WANDB_MODE says otherwise or an API key is configured.

    WANDB_MODE=online without any key falls back to offline (with a warning) rather than
    blocking a cluster job on an interactive login.
    """
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in {"offline", "disabled", "dryrun"}:
        return "offline" if mode == "dryrun" else mode
    if mode in {"online", "run"} or _has_api_key():
        if _has_api_key():
            return "online"
        log.warning("WANDB_MODE=%s but no W&B API key is configured; logging offline", mode)
    return "offline"


def wandb_logger(**kwargs: Any) -> Any:
    """A Lightning WandbLogger in the resolved mode (see `wandb_mode`)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode()
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs.setdefault("log_model", False)  # checkpoints hold patient-derived weights
    return WandbLogger(mode=mode, **kwargs)
