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

__all__ = ["config_hash", "config_identity", "identity_changes", "listed", "recorded_changes",
           "recorded_config", "same_model"]  # fmt: skip


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


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(config_identity(cfg), sort_keys=True, default=str)
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
    """`identity_changes` against a manifest's record; None when there is no record to read
    (a manifest written by hand, or before records were kept): then nothing counts as same."""
    recorded = (manifest or {}).get("config")
    if not isinstance(recorded, dict):
        return None
    try:
        return identity_changes(recorded, cfg)
    except (KeyError, TypeError, ValueError, OmegaConfBaseException):
        return None


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
