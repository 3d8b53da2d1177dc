"""Backbones exposing their stages, registered in :data:`mtlcv.registry.BACKBONES`."""

from . import lenet, resnet, segnet, tiny, unet  # noqa: F401  (register)
from .lenet import LeNet5
from .resnet import ResNet
from .segnet import SegNet
from .tiny import TinyNet
from .unet import UNet

__all__ = ["LeNet5", "ResNet", "SegNet", "TinyNet", "UNet"]
