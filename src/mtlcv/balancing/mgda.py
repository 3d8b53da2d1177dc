"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer
from .solvers import as_numpy, min_norm_simplex

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientBalancer):
    """Multiple-gradient descent: the min-norm element of the convex hull of the task gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, eq. 3
    (after Désidéri 2012): ``min_{alpha in simplex} ||sum_t alpha_t g_t||^2``; the update
    ``sum_t alpha_t g_t`` is a descent direction for every task, or zero at a Pareto-stationary
    point. The paper solves it with Frank-Wolfe (Algorithm 2); here it is solved exactly by
    Wolfe's min-norm-point algorithm (solvers.py), which the tests check against brute force.

    Normalisation (the official code's ``gradient_normalizers``, not in the paper): gradients
    are divided by ``1`` (``"none"``), ``||g_t||`` (``"l2"``), ``L_t`` (``"loss"``) or
    ``L_t ||g_t||`` (``"loss+"``) *before* solving; as in the official code the weights then
    multiply the raw losses, so the update is ``sum_t alpha_t g_t`` with raw gradients.

    * ``mgda``: gradients of the shared parameters (``mode="param"``, exact MGDA), normalisation
      ``"none"`` (the paper's algorithm).
    * ``mgda-ub``: gradients of the shared representation (``mode="rep"``), the paper's
      upper-bound approximation (sec. 3.3, Theorem 1), which is exact for MGDA-UB by definition;
      normalisation ``"loss+"``, the official code's setting for its experiments.

    The weights lie on the simplex (sum 1). Heads get ``alpha_t`` times their gradient
    (``scale_task_params``): the official code backpropagates ``sum_t alpha_t L_t``. Stateless.
    """

    scale_task_params = True

    def __init__(
        self,
        num_tasks: int,
        normalization: str = "none",
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"balancer.options.normalization is {normalization!r}; expected one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        self.normalization = normalization

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        norms = M.diagonal().clamp_min(0).sqrt()
        if self.normalization == "none":
            scale = torch.ones_like(norms)
        elif self.normalization == "l2":
            scale = norms
        else:
            if losses is None:
                raise ValueError(f"MGDA normalization {self.normalization!r} needs the losses")
            scale = losses.detach().to(M)
            if self.normalization == "loss+":
                scale = scale * norms
        scale = scale.clamp_min(1e-12)
        Mn = M / (scale[:, None] * scale[None, :])
        return torch.from_numpy(min_norm_simplex(as_numpy(Mn))).to(M)


@BALANCERS.register("mgda", help="MGDA (Sener & Koltun 2018), min-norm point, parameter space")
def mgda(
    num_tasks: int, normalization: str = "none", mode: str = "param", batched: bool = True
) -> MGDA:
    return MGDA(num_tasks, normalization, mode, batched)


@BALANCERS.register("mgda-ub", help="MGDA-UB (Sener & Koltun 2018), representation gradients")
def mgda_ub(
    num_tasks: int, normalization: str = "loss+", mode: str = "rep", batched: bool = True
) -> MGDA:
    return MGDA(num_tasks, normalization, mode, batched)
