"""Models: the smp factory, the weights resolver and the LightningModule."""

from spineseg.models.factory import build_model
from spineseg.models.module import SegmentationModule

__all__ = ["SegmentationModule", "build_model"]
