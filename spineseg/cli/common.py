"""Shared bits of the Hydra entry points: config location and one-line errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spineseg.errors import SpinesegError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user's mistake (SpinesegError) ends the program with one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpinesegError as err:
            logging.getLogger("spineseg").debug("error", exc_info=True)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper
