"""DualProj: the mean gradient projected onto the dual cone of the task gradients (torchjd)."""

from __future__ import annotations

import numpy as np
import torch

from ..registry import BALANCERS
from .solvers import nonneg_qp
from .upgrad import UPGrad


class DualProj(UPGrad):
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

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        A = self.prepared(M)  # UPGrad's normalised, regularised Gramian
        u = np.full(A.shape[0], 1.0 / A.shape[0])
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
