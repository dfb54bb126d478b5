"""spineseg: ensembles of pretrained encoder-decoders for Th8-Th11 segmentation in spine X-rays."""

__version__ = "0.1.0"

from spineseg.utils import resolvers as _resolvers

_resolvers.register()


def __getattr__(name: str):
    """`from spineseg import load_ensemble` without importing torch on `import spineseg`."""
    if name == "load_ensemble":
        from spineseg.predict import load_ensemble

        return load_ensemble
    raise AttributeError(f"module 'spineseg' has no attribute {name!r}")
