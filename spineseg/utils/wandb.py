"""W&B that is private by default: offline unless the user opts in, never a prompt."""

from __future__ import annotations

import logging
import netrc
import os
import socket
import urllib.parse
from typing import Any

from spineseg.errors import ConfigError, choices_message

log = logging.getLogger(__name__)


#: What WANDB_MODE may say; anything else is refused, so a typo never means "online".
MODES = ("offline", "online", "disabled")
REACH_TIMEOUT_S = 5.0


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(_host())
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def _host() -> str:
    return urllib.parse.urlsplit(_base_url()).hostname or "api.wandb.ai"


def _check_reachable() -> None:
    """An online run that cannot reach the server stops here within seconds, in one line,
    instead of wandb's own retries (minutes) or a login prompt on a cluster node."""
    url = urllib.parse.urlsplit(_base_url())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(
            f"W&B is online (WANDB_MODE=online) but {_base_url()} cannot be reached "
            f"({err.strerror or err}); run with WANDB_MODE=offline and `wandb sync` later"
        ) from None


def wandb_mode(requested: str | None = None) -> str:
    """`offline` unless the user asks for `online` in so many words: WANDB_MODE=online, or
    `mode: online` in the logger's config. An API key on the machine is not a request:
    films are patient data, and a key left in ~/.netrc must not send a run anywhere.

    Online needs a key and a reachable server; without either it stops in one line."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    mode = (requested or "").strip().lower() or env or "offline"
    if mode not in MODES:
        raise ConfigError(choices_message("W&B mode", mode, MODES))
    if mode == "online":
        if not _has_api_key():
            raise ConfigError(
                "W&B is online but no API key is configured (WANDB_API_KEY or `wandb login`); "
                "run with WANDB_MODE=offline to log locally"
            )
        _check_reachable()
    return mode


def wandb_logger(mode: str | None = None, **kwargs: Any) -> Any:
    """A Lightning WandbLogger in the resolved mode (see `wandb_mode`)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs.setdefault("log_model", False)  # checkpoints hold patient-derived weights
    return WandbLogger(mode=mode, **kwargs)
