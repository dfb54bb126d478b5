"""spineseg: ensembles of pretrained encoder-decoders for Th8-Th11 segmentation in spine X-rays."""

__version__ = "0.1.0"

from spineseg.utils import resolvers as _resolvers

_resolvers.register()
