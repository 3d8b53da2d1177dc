"""Dynamic Task Prioritization (Guo, Haque, Huang, Yeung & Fei-Fei, ECCV 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting, check_positive


class DynamicTaskPrioritization(Weighting):
    """DTP: harder tasks (lower KPI) get larger weights, through a focal-loss-like term.

    Guo et al., "Dynamic Task Prioritization for Multitask Learning", ECCV 2018, sec. 3.2
    (task-level prioritization): ``L = sum_t FL(kbar_t; gamma_t) L_t`` with the focal-loss form
    ``FL(p; gamma) = -(1 - p)^gamma log p`` and ``kbar_t`` the KPI of task t smoothed by an
    exponential moving average ``kbar(tau) = alpha kappa(tau) + (1 - alpha) kbar(tau - 1)``.

    KPIs. Each task reports its own KPI in [0, 1] through ``Task.kpi`` (mtlcv.tasks): mIoU for
    semantic segmentation, the fraction of pixels within 30 degrees for surface normals, the
    depth accuracy delta < 1.25, the F-score for edges, accuracy for classification. The trainer
    passes the validation KPIs once per epoch to ``on_epoch_end``; until the first one arrives
    every weight is 1. KPIs are clamped to [1e-4, 1] so that ``log`` stays finite.

    Hyper-parameters. The paper sets the focusing parameter per task and does not publish one
    default; ``gamma = 1`` here (a list gives one per task; ``gamma = 0`` gives ``-log kappa``).
    The paper's smoothing ``alpha`` has no published value either; ``alpha = 0.9`` here weighs
    the newest KPI most, which suits once-per-epoch KPIs. Weights are not renormalised (as in
    the paper).

    State (in ``state_dict()``): the smoothed KPIs and whether any has been seen.
    """

    def __init__(
        self, num_tasks: int, gamma: float | Sequence[float] = 1.0, alpha: float = 0.9
    ) -> None:
        super().__init__(num_tasks)
        gammas = [gamma] * num_tasks if isinstance(gamma, (int, float)) else list(gamma)
        if len(gammas) != num_tasks:
            raise ConfigError(
                f"balancer.options.gamma has {len(gammas)} values; expected 1 or {num_tasks}"
            )
        gammas = [check_positive(g, "gamma", allow_zero=True) for g in gammas]
        self.alpha = check_positive(alpha, "alpha")
        if self.alpha > 1:
            raise ConfigError(f"balancer.options.alpha must be in (0, 1], got {alpha!r}")
        self.register_buffer("gamma", torch.tensor(gammas), persistent=False)
        self.register_buffer("kpi", torch.ones(num_tasks))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        if not bool(self.seen):
            return torch.ones_like(losses)
        k = self.kpi.clamp(1e-4, 1.0)
        return (-((1 - k) ** self.gamma) * torch.log(k)).to(losses.device, losses.dtype)

    def on_epoch_end(
        self, epoch: int, train_losses: Sequence[float], kpis: Sequence[float] | None = None
    ) -> None:
        if kpis is None:
            return
        if len(kpis) != self.num_tasks:
            raise ConfigError(f"DTP got {len(kpis)} KPIs; expected {self.num_tasks}")
        new = torch.tensor([float(k) for k in kpis]).clamp(0.0, 1.0).to(self.kpi.device)
        if bool(self.seen):
            new = self.alpha * new + (1 - self.alpha) * self.kpi
        self.kpi.copy_(new)
        self.seen.fill_(True)


@BALANCERS.register("dtp", help="Dynamic Task Prioritization (Guo et al. 2018)")
def dtp(
    num_tasks: int, gamma: float | Sequence[float] = 1.0, alpha: float = 0.9
) -> DynamicTaskPrioritization:
    return DynamicTaskPrioritization(num_tasks, gamma, alpha)
