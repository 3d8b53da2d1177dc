"""Task balancing: loss weighting and gradient aggregation (see :mod:`mtlcv.balancing.base`)."""

from __future__ import annotations

from typing import Any

from ..registry import BALANCERS
from . import fixed  # noqa: F401  (registers)
from .base import Balancer, Weighting

__all__ = ["Balancer", "Weighting", "create"]


def create(name: str, num_tasks: int, **options: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``num_tasks`` tasks.

    Example:
        >>> import torch
        >>> from mtlcv import balancing
        >>> b = balancing.create("fixed", num_tasks=2, weights=[1.0, 0.5])
        >>> b.weights(torch.ones(2)).tolist()
        [1.0, 0.5]
    """
    return BALANCERS.create(name, where="balancer", num_tasks=num_tasks, **options)
