"""Registry of data sources by name (`synthetic`, `folder`, `aasce`, ...).

A source is a callable `build(**kwargs) -> list[Sample]`. Registries by name keep the
config flat: `data.source=aasce data.root=/path` picks `SOURCES["aasce"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def spec_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A data spec's ({source, root, split, source_kwargs}) options for its source: the
    source's own options plus `root` and `split` where set."""
    kwargs = dict(spec.get("source_kwargs") or {})
    for key in ("root", "split"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    return kwargs


def build_spec(spec: Mapping[str, Any], **kwargs: Any) -> list[Sample]:
    """Every sample of a data spec; kwargs (on_error, skipped...) go to the source too."""
    return build_source(spec["source"], **spec_kwargs(spec), **kwargs)
