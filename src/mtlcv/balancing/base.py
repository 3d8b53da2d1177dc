"""The balancer contract.

A balancer turns the per-task losses of one training step into gradients: after
``balancer.backward(losses, model)`` every parameter's ``.grad`` holds the update direction and
the trainer only calls ``optimizer.step()``. The trainer never asks which method it runs.

Two families (GUIDE.md, after torchjd and LibMTL):

* **loss weighting** (:class:`Weighting`): ``weights(losses)`` returns a weight per task from the
  losses and their history; the update is the gradient of ``sum_k w_k L_k``;
* **gradient aggregation**: the per-task gradients are stacked into a matrix ``G``
  (tasks x parameters) and ``aggregate(G)`` maps it to one update vector.

Stateful methods keep their state in ``state_dict()`` (buffers, parameters and
``get_extra_state``), which checkpoints save and ``--resume`` restores. Learnable balancer
parameters (e.g. uncertainty weighting's log-variances) are returned by ``parameters()`` and
optimised by the trainer together with the model.

Construction: ``mtlcv.balancing.create(name, num_tasks=T, **options)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Balancer(nn.Module):
    """Base class: sees the per-task losses and leaves ``.grad`` set for the optimizer."""

    #: "weighting" or "aggregation"
    family: str = "weighting"

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        """Set ``.grad`` from the loss vector ``losses`` (shape ``[T]``); return values to log."""
        raise NotImplementedError

    def on_epoch_end(
        self,
        epoch: int,
        train_losses: Sequence[float],
        kpis: Sequence[float] | None = None,
    ) -> None:
        """Hook called once per epoch with the mean training loss and the val KPI of each task."""


class Weighting(Balancer):
    """Loss weighting: the update is the gradient of ``sum_k w_k L_k``."""

    family = "weighting"

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        w = self.weights(losses)
        total = (w * losses).sum()
        total.backward()
        return {f"w{k}": float(v) for k, v in enumerate(w.detach().flatten().tolist())}
