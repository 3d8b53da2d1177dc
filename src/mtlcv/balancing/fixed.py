"""Fixed loss weights: the baseline every balancing paper compares against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting


class FixedWeights(Weighting):
    """``L = sum_k w_k L_k`` with constant weights ``w`` (equal weights, ``w_k = 1``, by default).

    Args:
        num_tasks: number of tasks T.
        weights: one non-negative weight per task, in the order of the config's ``tasks``;
            ``None`` gives equal weights of 1 (the "equal weighting" / EW baseline).
    """

    def __init__(self, num_tasks: int, weights: Sequence[float] | None = None) -> None:
        super().__init__(num_tasks)
        if weights is None:
            weights = [1.0] * num_tasks
        weights = list(weights)
        if len(weights) != num_tasks:
            raise ConfigError(
                f"balancer.options.weights has {len(weights)} values; expected one per task "
                f"({num_tasks})"
            )
        if any(float(w) < 0 for w in weights):
            raise ConfigError(f"balancer.options.weights must be non-negative, got {weights}")
        self.register_buffer("w", torch.tensor([float(w) for w in weights]))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.w.to(losses.device, losses.dtype)


@BALANCERS.register("fixed", help="fixed loss weights (equal weights by default)")
def fixed(num_tasks: int, weights: Sequence[float] | None = None) -> FixedWeights:
    return FixedWeights(num_tasks, weights)
