"""Backbones, heads and multi-task architectures (see :mod:`.base`)."""

from __future__ import annotations

from . import archs, backbones, heads  # noqa: F401  (register)
from .base import Backbone, MultiTaskModel

__all__ = ["Backbone", "MultiTaskModel"]
