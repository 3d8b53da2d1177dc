"""Datasets mapping to the batch contract (see :mod:`.base`)."""

from __future__ import annotations

from . import (  # noqa: F401  (register)
    cityscapes,
    multidigits,
    nyuv2,
    office,
    pascal_context,
    scenes,
)
from .base import MTLDataset, collate
from .scenes import ScenesDataset, render, write_cache

__all__ = ["MTLDataset", "ScenesDataset", "collate", "render", "write_cache"]
