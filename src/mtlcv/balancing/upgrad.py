"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024; torchjd)."""

from __future__ import annotations

import numpy as np
import torch

from ..registry import BALANCERS
from .base import GradientBalancer, check_positive
from .solvers import as_numpy, nonneg_qp


class UPGrad(GradientBalancer):
    """UPGrad: average of the task gradients, each projected onto the dual cone of all of them.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (UPGrad, with the
    projection ``pi_J`` of eq. 3 computed through Proposition 1), as in torchjd's ``UPGrad``:
    ``d = sum_i pi_J(u_i g_i)`` with
    ``u = 1/T`` (torchjd's default mean preference) and ``pi_J`` the projection onto the dual cone
    ``{x : G x >= 0}``; the projection of ``G^T u_i e_i`` is ``G^T v_i`` with
    ``v_i = argmin_{v >= u_i e_i} v^T M v``, a small QP on the Gramian solved exactly by an
    active-set method (solvers.py). Every projection has a non-negative inner product with every
    task gradient, hence so has ``d``. As in torchjd (``torchjd/_linalg/_gramian.py``,
    ``normalize`` and ``regularize``), the Gramian is first divided by its trace and regularised
    by ``reg_eps * I`` with ``reg_eps = 1e-4`` to make it positive definite; a Gramian whose trace
    is below ``norm_eps = 1e-4`` is replaced by zeros, so the projections leave the preference
    ``1/T`` unchanged and the update is the *mean* gradient (small, since its trace is below
    ``norm_eps``), not zero. Heads get their plain gradients (torchjd's ``mtl_backward``).
    Stateless.
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

    def prepared(self, M: torch.Tensor) -> np.ndarray:
        """torchjd's ``normalize`` then ``regularize`` of the Gramian ``M`` (see above)."""
        A = as_numpy(M)
        tr = float(np.trace(A))
        A = np.zeros_like(A) if tr < self.norm_eps else A / tr
        return A + self.reg_eps * np.eye(A.shape[0])

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        A = self.prepared(M)
        T = A.shape[0]
        w = np.zeros(T)
        for i in range(T):
            u = np.zeros(T)
            u[i] = 1.0 / T
            # v = u + x with x >= 0: min 1/2 x^T A x + (A u)^T x
            w += u + nonneg_qp(A, A @ u)
        return torch.from_numpy(w).to(M)


@BALANCERS.register("upgrad", help="UPGrad (Quinton & Rey 2024, torchjd)")
def upgrad(
    num_tasks: int,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    mode: str = "param",
    batched: bool = True,
) -> UPGrad:
    return UPGrad(num_tasks, norm_eps, reg_eps, mode, batched)
