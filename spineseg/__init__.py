"""spineseg: ensembles of pretrained encoder-decoders for Th8-Th11 segmentation in spine X-rays."""

__version__ = "0.1.0"

#: Label values used everywhere: 0 = background, 1..4 = Th8..Th11.
VERTEBRAE: tuple[str, ...] = ("Th8", "Th9", "Th10", "Th11")

from spineseg.utils import resolvers as _resolvers  # noqa: E402

_resolvers.register()
