"""What every entry point shares: each is a Hydra app over its own small config in `conf/`
(`hydra_app`), so `--help`, `--cfg job`, overrides and errors behave the same everywhere; a
user's mistake ends with one line (`one_line_errors`)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from spineseg.config import CONF_DIR
from spineseg.errors import SpinesegError

__all__ = ["CONF_DIR", "flag", "hydra_app", "one_line_errors"]


def one_line_errors(fn: Callable[..., Any], usage: str | None = None) -> Callable[..., Any]:
    """A user's mistake (SpinesegError, or a required `???` option left out) ends the
    program with one line, not a traceback."""
    from omegaconf.errors import MissingMandatoryValue

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpinesegError as err:
            logging.getLogger("spineseg").debug("error", exc_info=True)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except MissingMandatoryValue as err:
            key = getattr(err, "full_key", None) or "an option"
            print(f"error: {key} is required{f'; {usage}' if usage else ''}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def hydra_app(
    config_name: str, task: Callable[[DictConfig], Any], usage: str, config_dir: str = CONF_DIR
) -> Callable[[Sequence[str] | None], int]:
    """`main(argv=None)` of a Hydra app over `<config_dir>/<config_name>.yaml` running
    `task(cfg)`. `argv` stands in for the command line (tests and other Python callers);
    without it Hydra reads sys.argv as usual."""
    import hydra

    app = hydra.main(version_base="1.3", config_path=config_dir, config_name=config_name)(
        one_line_errors(task, usage)
    )

    def main(argv: Sequence[str] | None = None) -> int:
        overrides = list(sys.argv[1:] if argv is None else argv)
        plain = without_flags(overrides)
        if plain is not None:  # None: --help and the like, Hydra's own
            multirun = any(a in MULTIRUN_FLAGS for a in overrides)
            for probe in sweep_probes(plain) if multirun else [plain]:
                check_overrides(config_name, probe, config_dir)
        if argv is None:
            app()
            return 0
        saved = sys.argv
        sys.argv = [saved[0] if saved else config_name, *argv]
        try:
            app()
        finally:
            sys.argv = saved
        return 0

    main.__doc__ = usage
    return main


MULTIRUN_FLAGS = ("-m", "--multirun")
#: Hydra's flags that still compose the overrides (`--cfg job` prints the config, `--help`
#: the options with their values), with whether each takes a value; any other flag
#: (`--info`, `--hydra-help`, ...) skips the check.
COMPOSING_FLAGS = {"-m": False, "--multirun": False, "-c": True, "--cfg": True,
                   "-p": True, "--package": True, "--resolve": False,
                   "-h": False, "--help": False}  # fmt: skip


def without_flags(argv: Sequence[str]) -> list[str] | None:
    """The overrides of a command line without Hydra's composing flags (and their values),
    or None when it holds another flag, whose output is Hydra's own."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in COMPOSING_FLAGS:
            skip = COMPOSING_FLAGS[a]
        elif a.startswith("-"):
            return None
        else:
            out.append(a)
    return out


def sweep_probes(overrides: Sequence[str]) -> list[list[str]]:
    """A multirun's overrides as jobs that, between them, hold every swept value once: the
    first job (`model=a,b` -> `model=a`), then each other value with the rest at their first.
    Composing these makes a sweep's bad key or value one line before Hydra starts it, at one
    composition per value rather than per job. What does not parse is returned as it is, for
    `check_overrides` to name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return [list(overrides)]
    values: list[list[str]] = []
    for o in parsed:
        if not o.is_sweep_override():
            values.append([o.input_line])
            continue
        try:  # interval() is a sampler's range and glob() needs the options: no values here
            swept = list(o.sweep_string_iterator())
        except HydraException:
            swept = []
        values.append([f"{o.get_key_element()}={v}" for v in swept])
    values = [v for v in values if v]
    first = [v[0] for v in values]
    return [first] + [
        [*first[:i], other, *first[i + 1 :]]
        for i, options in enumerate(values)
        for other in options[1:]
    ]


def check_overrides(config_name: str, overrides: Sequence[str], config_dir: str = CONF_DIR) -> None:
    """Compose once before the app runs, so that a bad override is one line naming it (and
    the valid keys) rather than Hydra's paragraph."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from spineseg.config import compose

    try:
        compose(overrides, config_name, config_dir)
    except (HydraException, OmegaConfBaseException) as err:
        message = hydra_error_line(err)
        if "not in struct" in message:
            message += unknown_key_hint(message, overrides, config_name, config_dir)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except ValueError as err:  # Hydra's defaults list: a config group set to null
        nulls = [o.partition("=")[0] for o in overrides if o.endswith("=null")]
        hint = f" ({nulls[0]}=null: a config group takes one of its options; ~{nulls[0]} drops it)"
        print(f"error: {err}{hint if nulls else ''}", file=sys.stderr)
        sys.exit(1)


def unknown_key_hint(
    message: str, overrides: Sequence[str], config_name: str, config_dir: str = CONF_DIR
) -> str:
    """For Hydra's "Key 'x' is not in struct": the keys of the node the override reaches into
    (`module.lr` lists `module`'s, not the top level's), and where a key of that name does
    live (`module.optimizer.lr`) or the nearest spelling of it."""
    import difflib
    import re

    from spineseg.config import compose

    found = re.search(r"Could not override '([^']+)'", message)
    key = found.group(1).lstrip("+~") if found else ""
    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") != key]
    try:
        cfg = compose(rest, config_name, config_dir)
    except Exception:  # the other overrides fail too: their own error comes next
        cfg = compose((), config_name, config_dir)
    tree: dict = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]
    tree.pop("hydra", None)
    # the deepest node the key reaches; its first missing part is the unknown key
    node, reached, leaf = tree, [], key
    for part in key.split("."):
        leaf = part
        if not isinstance(node.get(part), dict):
            break
        node = node[part]
        reached.append(part)
    parent = ".".join(reached)
    hint = f"; valid keys{f' of {parent}' if parent else ''}: {', '.join(map(str, node))}"
    elsewhere = [p for p in _key_paths(tree) if p.rpartition(".")[2] == leaf]
    close = difflib.get_close_matches(leaf, [str(k) for k in node], n=1)
    if parent and (Path(config_dir) / parent / f"{leaf}.yaml").is_file():
        hint += f" ({parent}={leaf} picks that preset)"
    elif elsewhere:
        hint += f" (did you mean {' or '.join(elsewhere[:3])}?)"
    elif close:
        hint += f" (did you mean {'.'.join(filter(None, [parent, close[0]]))}?)"
    return hint


def _key_paths(tree: Any, prefix: str = "") -> list[str]:
    """Every key of a nested dict as a dotted path."""
    if not isinstance(tree, dict):
        return []
    paths = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        paths += [path, *_key_paths(v, f"{path}.")]
    return paths


def hydra_error_line(err: BaseException) -> str:
    """Hydra's several-line composition error (and its cause) as one line, with a group's
    valid choices where it lists them."""
    from hydra.errors import OverrideParseException

    text = str(err) if err.__cause__ is None else f"{err}\n{err.__cause__}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(err, OverrideParseException):
        return (
            f"cannot parse the override {err.override!r}: {lines[0]} (a list item holding = "
            "or spaces needs quotes: key='[\"a=b\"]')"
        )
    if "Available options in" in text:
        at = next(i for i, ln in enumerate(lines) if ln.startswith("Available options in"))
        end = next((i for i, ln in enumerate(lines) if ln.startswith("Config search path")), None)
        options = [o for o in lines[at + 1 : end] if not o.startswith("_")]
        return f"{' '.join(lines[:at])}; valid choices: {', '.join(options)}"
    noise = ("full_key", "object_type", "To append", "See https://", "Config search", "provider=")
    return " ".join(ln for ln in lines if not ln.startswith(noise))


def flag(cfg: DictConfig, key: str) -> bool:
    """A true/false option, checked: `overlay=maybe` is one line, not a silent truth."""
    from spineseg.errors import ConfigError

    value = cfg[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value
