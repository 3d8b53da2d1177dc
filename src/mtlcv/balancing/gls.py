"""GLS: the geometric loss strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR-W 2019)."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import BALANCERS
from .base import Weighting, weight_logs


class GeometricLoss(Weighting):
    """GLS: minimise the geometric mean of the task losses, ``(prod_t L_t)^(1/T)``.

    Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy
    for Multi-Task Learning", CVPR Workshops 2019, sec. 3.2 (eq. 4). Its gradient is
    ``sum_t w_t grad L_t`` with ``w_t = (prod_s L_s)^(1/T) / (T L_t)``: the gradients of the
    log-losses, equally weighted and scaled by the geometric mean, so rescaling one task's loss by
    ``c`` scales the update by ``c^(1/T)`` but leaves its direction alone (the strategy's point:
    no task dominates by the size of its loss). No hyper-parameters; stateless. The geometric
    mean is computed as ``exp(mean(log L))`` (the product of many small losses underflows); losses
    are floored at 1e-12 for the logarithm. LibMTL's implementation (``LibMTL/weighting/GLS.py``)
    backpropagates the same objective; the weights it returns for logging (``L_t / (T prod L)``)
    are not the gradient's, the ones logged here are.
    """

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        L = losses.detach().clamp_min(1e-12)
        geo = torch.exp(torch.log(L).mean())
        return geo / (self.num_tasks * L)

    def objective(self, losses: torch.Tensor) -> torch.Tensor:
        """``(prod_t L_t)^(1/T)``, the loss GLS minimises."""
        return torch.exp(torch.log(losses.clamp_min(1e-12)).mean())

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        w = self.weights(losses)
        # sum_t w_t L_t has the objective's gradient (w is its derivative, held constant)
        (w * losses).sum().backward()
        return weight_logs(w)


@BALANCERS.register("gls", help="Geometric loss strategy (Chennupati et al. 2019)")
def gls(num_tasks: int) -> GeometricLoss:
    return GeometricLoss(num_tasks)
