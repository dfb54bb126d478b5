"""Exception types. Every error a user can cause is one of these, with a one-line message
that names the offending file or value and, where there is a choice, the valid choices."""

from __future__ import annotations

import errno
import signal
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


class Interrupted(BaseException):
    """SIGTERM (how SLURM pre-empts and times out jobs) or SIGINT (Ctrl-C) arrived.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way up
    (a skipped film, a recorded failure) can swallow it; the entry point marks the model
    `interrupted` and exits with the shell's code for the signal (143, 130)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)


def raise_on_signals() -> None:
    """SIGTERM and SIGINT raise `Interrupted` in the main thread (Lightning keeps calling
    this handler after its own during fit). Both are unblocked too: a blocked signal mask is
    inherited through fork and exec, and a parent that had blocked them would leave the
    scheduler's SIGTERM pending until the job ends, so a pre-empted run would finish as if
    it had never been signalled."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def os_error_line(err: OSError, where: str | Path) -> str:
    """A full disk, a read-only folder or a missing permission, said in one line that names
    the path (the file when the OS names it, else the folder being written)."""
    path = err.filename or where
    return f"{path}: {err.strerror or err} (while writing under {where})"


#: OS errors that are the machine's state, not a bug: one line, never a traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def choices_message(kind: str, value: object, choices: list[str] | tuple[str, ...]) -> str:
    """`unknown model 'x'; valid choices: a, b, c` - the one format used for every bad name."""
    shown = ", ".join(sorted(choices)[:60])
    more = "" if len(choices) <= 60 else f", ... ({len(choices)} in all)"
    return f"unknown {kind} {value!r}; valid choices: {shown}{more}"
