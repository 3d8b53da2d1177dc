"""Dynamic Weight Averaging (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting, check_positive


class DynamicWeightAverage(Weighting):
    """DWA: weights from the rate of change of each task's mean training loss.

    Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019, sec. 3.3 (DWA):
    ``w_k(t) = K exp(r_k(t-1)/T) / sum_i exp(r_i(t-1)/T)``, with
    ``r_k(t-1) = L_k(t-1) / L_k(t-2)`` the ratio of the mean training losses of the last two
    epochs, ``K`` the number of tasks (the weights sum to K) and temperature ``T = 2`` (the
    paper's value). ``w_k = 1`` for the first two epochs, before two losses exist. Works for any
    number of tasks.

    State (in ``state_dict()``): the mean losses of the last two epochs and how many epochs have
    been seen, fed by ``on_epoch_end``.
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        self.temperature = check_positive(temperature, "temperature")
        self.register_buffer("history", torch.ones(2, num_tasks, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("w", torch.ones(num_tasks))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.w.to(losses.device, losses.dtype)

    def on_epoch_end(
        self, epoch: int, train_losses: Sequence[float], kpis: Sequence[float] | None = None
    ) -> None:
        if len(train_losses) != self.num_tasks:
            raise ConfigError(
                f"DWA got {len(train_losses)} epoch losses; expected {self.num_tasks}"
            )
        new = torch.tensor([float(v) for v in train_losses], dtype=torch.float64)
        self.history.copy_(torch.stack([self.history[1], new.to(self.history.device)]))
        self.seen += 1
        if int(self.seen) >= 2:
            r = self.history[1] / self.history[0].clamp_min(1e-12)
            self.w.copy_(self.num_tasks * torch.softmax(r / self.temperature, 0))


@BALANCERS.register("dwa", help="Dynamic Weight Averaging (Liu et al. 2019), temperature 2")
def dwa(num_tasks: int, temperature: float = 2.0) -> DynamicWeightAverage:
    return DynamicWeightAverage(num_tasks, temperature)
