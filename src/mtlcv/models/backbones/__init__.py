"""Backbones exposing their stages, registered in :data:`mtlcv.registry.BACKBONES`."""

from . import resnet, segnet, tiny  # noqa: F401  (register)
from .resnet import ResNet
from .segnet import SegNet
from .tiny import TinyNet

__all__ = ["ResNet", "SegNet", "TinyNet"]
