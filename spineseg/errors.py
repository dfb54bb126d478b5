"""Exception types. Every error a user can cause is one of these, with a one-line message
that names the offending file or value and, where there is a choice, the valid choices."""

from __future__ import annotations

from pathlib import Path


class SpinesegError(Exception):
    """Base class: the CLIs print these as one line instead of a stack trace."""


class ConfigError(SpinesegError, ValueError):
    """A configuration value is invalid (unknown name, bad size, ...)."""


class RefusedError(ConfigError):
    """A run refused before it changed anything (the folder is busy, or holds a model trained
    with another config): nothing may be recorded over what is there."""


class WeightsError(SpinesegError, RuntimeError):
    """Pretrained weights cannot be found, fetched or loaded."""


class DataError(SpinesegError, ValueError):
    """A data file is unreadable or inconsistent. Always names the file."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class StoreError(SpinesegError, ValueError):
    """The prediction store is incomplete or inconsistent."""


def choices_message(kind: str, value: object, choices: list[str] | tuple[str, ...]) -> str:
    """`unknown model 'x'; valid choices: a, b, c` - the one format used for every bad name."""
    shown = ", ".join(sorted(choices)[:60])
    more = "" if len(choices) <= 60 else f", ... ({len(choices)} in all)"
    return f"unknown {kind} {value!r}; valid choices: {shown}{more}"
