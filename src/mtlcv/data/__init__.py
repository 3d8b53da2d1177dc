"""Datasets mapping to the batch contract (see :mod:`.base`)."""

from __future__ import annotations

from . import cityscapes, nyuv2, office, pascal_context, scenes  # noqa: F401  (register)
from .base import MTLDataset
from .scenes import ScenesDataset, render, write_cache

__all__ = ["MTLDataset", "ScenesDataset", "render", "write_cache"]
