"""Tasks: head channels, loss, streaming metrics and metric directions (see :mod:`.base`)."""

from __future__ import annotations

from typing import Any

from ..registry import TASKS
from . import (  # noqa: F401  (register)
    classification,
    depth,
    detection,
    edges,
    normals,
    saliency,
    segmentation,
)
from .base import Metric, Task

__all__ = ["Metric", "Task", "create"]


def create(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` (e.g. ``create("semseg", num_classes=13)``)."""
    return TASKS.create(name, where="tasks", **options)
