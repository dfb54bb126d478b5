"""Shared bits of the Hydra entry points: config location and one-line errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spineseg.config import CONF_DIR
from spineseg.errors import SpinesegError

__all__ = ["CONF_DIR", "key_values", "one_line_errors"]


def key_values(
    argv: Sequence[str], defaults: Mapping[str, str | None], usage: str
) -> dict[str, str]:
    """`key=value` arguments over `defaults`; a bare word or an unknown key is one line."""
    from spineseg.errors import ConfigError, choices_message

    opts = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r} is not key=value; {usage}")
        if key not in defaults:
            raise ConfigError(choices_message("argument", key, list(defaults)))
        opts[key] = value
    return opts  # type: ignore[return-value]


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
