"""Datasets mapping to the batch contract (see :mod:`.base`)."""

from __future__ import annotations

from . import multidigits, nyuv2, scenes  # noqa: F401  (register)
from .base import MTLDataset, collate
from .scenes import ScenesDataset, render, write_cache

__all__ = ["MTLDataset", "ScenesDataset", "collate", "render", "write_cache"]
