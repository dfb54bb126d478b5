"""Registry of data sources by name (`synthetic`, `folder`, `aasce`, ...).

A source is a callable `build(**kwargs) -> list[Sample]`. Registries by name keep the
config flat: `data.source=aasce data.root=/path` picks `SOURCES["aasce"]`.
"""

from __future__ import annotations

import inspect
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
    fn = SOURCES[name]
    _check_options(name, fn, kwargs)
    return fn(**kwargs)


#: Every source takes these from the pipeline, not from the user's config.
_PIPELINE_OPTIONS = ("on_error", "skipped")


def _check_options(name: str, fn: SourceFn, kwargs: Mapping[str, Any]) -> None:
    """An option the source does not take (`data.root` with the synthetic source, a typo in
    `data.source_kwargs`) is one line naming it and the source's options, not a TypeError."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        own = [p for p in params if p not in _PIPELINE_OPTIONS]
        raise ConfigError(
            f"the {name} source takes no option {', '.join(map(repr, unknown))} (data.root, "
            f"data.split or a key of data.source_kwargs); its options: {', '.join(own)}"
        )


def spec_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A data spec's ({source, root, split, source_kwargs}) options for its source: the
    source's own options plus `root` and `split` where set."""
    kwargs = dict(spec.get("source_kwargs") or {})
    for key in ("root", "split"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    return kwargs


def build_spec(spec: Mapping[str, Any], **kwargs: Any) -> list[Sample]:
    """Every sample of a data spec; kwargs (on_error, skipped...) go to the source too. A
    spec's `level_corrections` (a CSV, `spineseg.data.level_check.read_corrections`) renames
    the listed films' vertebrae before anything else sees them: training, the store's truth,
    the checks and the scores all read the corrected labels."""
    samples = build_source(spec["source"], **spec_kwargs(spec), **kwargs)
    if spec.get("level_corrections"):
        from spineseg.data.level_check import apply_corrections, read_corrections

        path = spec["level_corrections"]
        samples = apply_corrections(samples, read_corrections(path), path)
    return samples
