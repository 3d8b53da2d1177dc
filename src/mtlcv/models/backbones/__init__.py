"""Backbones exposing their stages."""
from . import resnet, tiny  # noqa: F401
