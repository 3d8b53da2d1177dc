"""DualProj: the mean gradient projected onto the dual cone of the task gradients (torchjd)."""

from __future__ import annotations

import numpy as np
import torch

from ..registry import BALANCERS
from .base import GradientBalancer, check_positive
from .solvers import as_numpy, nonneg_qp


class DualProj(GradientBalancer):
    """DualProj: ``d = argmin_{x : G x >= 0} ||x - mean_t g_t||``.

    torchjd's ``DualProj`` aggregator (Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024), which solves eq. 11 of Lopez-Paz & Ranzato, "Gradient Episodic Memory
    for Continual Learning", NeurIPS 2017 (GEM's projection) for the average gradient: the
    closest vector to the mean that conflicts with no task gradient. By Proposition 1 of
    Quinton & Rey the projection of ``G^T u`` is ``G^T v`` with ``v = argmin_{v >= u} v^T M v``
    on the Gramian ``M = G G^T``; here ``u = 1/T`` (torchjd's default preference) and the
    non-negative QP is solved exactly by an active set (solvers.py; torchjd uses quadprog). As in
    torchjd the Gramian is divided by its trace (below ``norm_eps = 1e-4`` it counts as zero,
    and the weights stay ``u``) and regularised by ``reg_eps * I`` (``reg_eps = 1e-4``). Without
    conflicts (``G g >= 0`` for the mean ``g``) ``d`` is the mean itself. UPGrad (``upgrad``)
    projects each gradient instead and averages the projections. Heads get their plain gradients
    (torchjd's ``mtl_backward``). Stateless.
    """

    def __init__(
        self,
        num_tasks: int,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        self.norm_eps = check_positive(norm_eps, "norm_eps", allow_zero=True)
        self.reg_eps = check_positive(reg_eps, "reg_eps", allow_zero=True)

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        A = as_numpy(M)
        T = A.shape[0]
        tr = float(np.trace(A))
        A = np.zeros_like(A) if tr < self.norm_eps else A / tr
        A = A + self.reg_eps * np.eye(T)
        u = np.full(T, 1.0 / T)
        # v = u + x with x >= 0: min 1/2 x^T A x + (A u)^T x
        return torch.from_numpy(u + nonneg_qp(A, A @ u)).to(M)


@BALANCERS.register("dualproj", help="DualProj (torchjd), mean projected onto the dual cone")
def dualproj(
    num_tasks: int,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    mode: str = "param",
    batched: bool = True,
) -> DualProj:
    return DualProj(num_tasks, norm_eps, reg_eps, mode, batched)
