"""MoDo: multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen,
NeurIPS 2023)."""

from __future__ import annotations

import torch

from ..registry import BALANCERS
from .base import check_positive
from .double_sampling import DoubleSampling
from .solvers import project_simplex


class MoDo(DoubleSampling):
    """MoDo: stochastic MGDA whose weight update uses two independent gradient samples.

    Chen et al., "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization
    and Conflict-Avoidance", NeurIPS 2023 (JMLR 2024), Algorithm 1: one projected gradient step
    on MGDA's objective ``1/2 ||G^T lambda||^2`` with an unbiased gradient estimate and an l2
    regulariser, then the update with a third sample:

    ``lambda <- Pi_simplex(lambda - gamma (G1 G2^T lambda + rho lambda))``, ``d = G3^T lambda``,

    ``lambda = 1/T`` at the start. ``gamma = 1e-3`` and ``rho = 0.1`` are the defaults of LibMTL's
    port of the authors' code (github.com/heshandevaka/Trade-Off-MOL). For a fixed ``G`` the
    weights converge to the minimiser of ``1/2 lambda^T (G G^T + rho I) lambda`` on the simplex
    (MGDA's min-norm weights when ``rho = 0``). Samples: see :class:`DoubleSampling` (the papers'
    three batches per step are not available to a balancer; heads get their plain gradient,
    which is what LibMTL's average of the three batches' head gradients is in expectation).
    ``last_weights`` are ``lambda``. State: ``lambda`` and the previous ``G``.
    """

    def __init__(
        self, num_tasks: int, gamma: float = 1e-3, rho: float = 0.1, samples: str = "previous",
        mode: str | None = None, batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, samples, mode, batched)
        self.gamma = check_positive(gamma, "gamma", allow_zero=True)
        self.rho = check_positive(rho, "rho", allow_zero=True)
        self.register_buffer("lambd", torch.full((num_tasks,), 1.0 / num_tasks,
                                                 dtype=torch.float64))

    def aggregate_samples(self, G1: torch.Tensor, G2: torch.Tensor,
                          G3: torch.Tensor) -> torch.Tensor:
        lam = self.lambd.cpu().numpy()
        C = (G1.double() @ G2.double().T).cpu().numpy()
        lam = project_simplex(lam - self.gamma * (C @ lam + self.rho * lam))
        self.lambd.copy_(torch.from_numpy(lam))
        self.last_weights = self.lambd.to(G3)
        return self.last_weights @ G3


@BALANCERS.register("modo", help="MoDo (Chen et al. 2023), double-sampled stochastic MGDA")
def modo(
    num_tasks: int, gamma: float = 1e-3, rho: float = 0.1, samples: str = "previous",
    mode: str = "param", batched: bool = True,
) -> MoDo:
    return MoDo(num_tasks, gamma, rho, samples, mode, batched)
