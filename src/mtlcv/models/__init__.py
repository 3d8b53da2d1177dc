"""Backbones, heads and multi-task architectures (see :mod:`.base`)."""

from __future__ import annotations

from . import archs, backbones, heads  # noqa: F401  (register)
from .base import Backbone, ImageNormalize, MultiTaskModel
from .build import build_backbone, build_head, build_model

__all__ = [
    "Backbone",
    "ImageNormalize",
    "MultiTaskModel",
    "build_backbone",
    "build_head",
    "build_model",
]
