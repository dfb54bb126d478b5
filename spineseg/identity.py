"""What makes two configs the same stored model (docs/architecture.md).

A model in a run's store is what `model`, `module`, `data` (less workers and caches), `seed`
and `trainer.max_epochs` say; its manifest keeps their hash and the whole resolved config, so
a rerun can tell "the same model: skip or resume" from "another config: refuse", and can say
which keys changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["config_hash", "config_identity", "identity_changes", "input_digests", "listed",
           "recorded_changes", "recorded_config", "same_model"]  # fmt: skip


#: Config sections that define what a stored model *is*; others (logging, paths,
#: workers, launcher) may change between a run and its resumption.
IDENTITY_KEYS = ("model", "module", "data", "seed")
VOLATILE_DATA_KEYS = ("num_workers", "cache", "cache_dir", "on_error")


def config_identity(cfg: DictConfig) -> dict[str, Any]:
    """The sections of `cfg` that define the model, resolved, less what may change."""
    ident = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        if isinstance(cfg[k], DictConfig)
        else cfg[k]
        for k in IDENTITY_KEYS
    }
    for k in VOLATILE_DATA_KEYS:
        ident["data"].pop(k, None)
    ident["max_epochs"] = cfg.trainer.get("max_epochs")
    return ident


#: Identity options that name a file whose contents define the model: answers added to a
#: reader's review.csv make another model, though the option still names the same file.
FILE_KEYS = ("data.level_corrections", "data.external.level_corrections")


def input_digests(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """What each set `FILE_KEYS` file says, as a digest and a count of films; the manifest
    keeps it beside the config, which keeps only the path."""
    from spineseg.data.level_check import read_corrections

    out: dict[str, dict[str, Any]] = {}
    for key in FILE_KEYS:
        path = OmegaConf.select(cfg, key, default=None)
        if path:
            said = sorted(read_corrections(path).items())
            blob = json.dumps(said).encode()
            out[key] = {"sha256": hashlib.sha256(blob).hexdigest()[:16], "films": len(said)}
    return out


def config_hash(cfg: DictConfig) -> str:
    ident: dict[str, Any] = config_identity(cfg)
    digests = input_digests(cfg)
    if digests:  # absent otherwise, so that every earlier hash stays what it was
        ident["inputs"] = digests
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Where the package default of an identity key lives: the base every preset of the group
#: starts from. `model` presets have no common base, so a model key has no default here.
_DEFAULT_GROUPS = {"data": "data/_base", "module": "module/default"}
_ABSENT = object()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _package_default(key: str) -> Any:
    from spineseg.config import group

    section, _, rest = key.partition(".")
    if section not in _DEFAULT_GROUPS:
        return _ABSENT
    node: Any = group(_DEFAULT_GROUPS[section])
    for part in rest.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def identity_changes(recorded: dict[str, Any], cfg: DictConfig) -> list[str]:
    """How this config differs from a stored model's recorded one, as `key: old -> new`
    entries; empty when both define the same model.

    A key absent from the record is an option added to the package after the model was
    trained; at its package default it reproduces what the model ran with (the rule every new
    option follows), so it is no change: upgrading spineseg never turns a finished or
    half-finished sweep into "another config". Data roots are compared as absolute paths.
    """
    old = _flat(config_identity(OmegaConf.create(recorded)))
    new = _flat(config_identity(OmegaConf.create(recorded_config(cfg))))
    changes = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before is _ABSENT:
            default = _package_default(key)
            if default is not _ABSENT and _same(after, default):
                continue
        if before is _ABSENT or after is _ABSENT or not _same(before, after):
            changes.append(f"{key}: {_shown(before)} -> {_shown(after)}")
    return changes


def _shown(value: Any) -> str:
    return "(not set)" if value is _ABSENT else json.dumps(value, default=str)


def listed(changes: list[str], most: int = 4) -> str:
    """Changes as a parenthesised clause for a message, at most `most` of them."""
    if not changes:
        return ""
    more = f"; {len(changes) - most} more" if len(changes) > most else ""
    return f" ({'; '.join(changes[:most])}{more})"


def same_model(manifest: dict[str, Any] | None, cfg: DictConfig, digest: str) -> bool:
    """Whether a stored model's manifest records this config: the same hash, or a record
    that differs only by options added since at their defaults (`identity_changes`)."""
    if not manifest or manifest.get("config_hash") is None:
        return False
    if manifest["config_hash"] == digest:
        return True
    return recorded_changes(manifest, cfg) == []


def recorded_changes(manifest: dict[str, Any] | None, cfg: DictConfig) -> list[str] | None:
    """`identity_changes` against a manifest's record, and what its files said
    (`input_digests`); None when there is no record to read (a manifest written by hand, or
    before records were kept): then nothing counts as same."""
    recorded = (manifest or {}).get("config")
    if not isinstance(recorded, dict):
        return None
    try:
        changes = identity_changes(recorded, cfg)
    except (KeyError, TypeError, ValueError, OmegaConfBaseException):
        return None
    return changes + _input_changes((manifest or {}).get("inputs"), cfg)


def _input_changes(recorded: Any, cfg: DictConfig) -> list[str]:
    """A file that says something else now; a path set or unset is already a config change,
    and a model recorded before digests were kept cannot be compared (it counts as same)."""
    if not isinstance(recorded, dict):
        return []
    now = input_digests(cfg)
    changes = []
    for key in sorted(recorded.keys() & now.keys()):
        before, after = recorded[key], now[key]
        if not isinstance(before, dict) or before.get("sha256") != after["sha256"]:
            films = before.get("films") if isinstance(before, dict) else None
            changes.append(f"{key}: what the file says changed ({films} -> {after['films']} films)")
    return changes


def recorded_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as the manifest keeps it, its data roots (and label corrections) made
    absolute: a root given relative to where training ran (`../shared/data/...`) would not
    be found again by `spineseg-score` (or a benchmark that reads a run's films) run from
    another folder."""
    out: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    data = out.get("data") or {}
    for spec in (data, data.get("external") or {}):
        for key in ("root", "level_corrections"):
            path = spec.get(key)
            if isinstance(path, str) and path and not os.path.isabs(path):
                spec[key] = os.path.abspath(path)
    return out
