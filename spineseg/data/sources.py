"""Registry of data sources by name (`synthetic`, `folder`, `aasce`, ...).

A source is a callable `build(**kwargs) -> list[Sample]`. Registries by name keep the
config flat: `data.source=aasce data.root=/path` picks `SOURCES["aasce"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spineseg.data.sample import Sample
from spineseg.errors import ConfigError, choices_message

SourceFn = Callable[..., list[Sample]]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn

    return deco


def _import_builtin_sources() -> None:
    # Imported lazily so `import spineseg.data` stays cheap and import cycles cannot occur.
    from spineseg.data import aasce, folder, synthetic  # noqa: F401


def build_source(name: str, **kwargs: Any) -> list[Sample]:
    """Load every sample of source `name`; kwargs are the source's own options."""
    _import_builtin_sources()
    if name not in SOURCES:
        raise ConfigError(choices_message("data source", name, list(SOURCES)))
    return SOURCES[name](**kwargs)
