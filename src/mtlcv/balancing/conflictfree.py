"""ConFIG: conflict-free inverse gradients (Liu, Chu, Thuerey, ICLR 2025)."""

from __future__ import annotations

import torch

from ..registry import BALANCERS
from .base import GradientBalancer


class ConFIG(GradientBalancer):
    """ConFIG: the update with the same cosine to every task gradient.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, eq. 2 (as torchjd's ``ConFIG`` and the authors' ``conflictfree``
    package): with the unit gradients ``u_t = g_t / ||g_t||`` stacked in ``U``,

    ``v = U^+ 1`` (the least-norm solution of ``U v = 1``: equal projections on every unit
    gradient), ``d = (sum_t g_t . v/||v||) v/||v||``,

    so ``cos(d, g_t)`` is the same positive number for every task (when the gradients are
    linearly independent) and the length of ``d`` is the sum of the gradients' projections on
    its direction. Everything is an inner product, so it runs on the Gramian ``M = G G^T``:
    ``U^+ 1 = U^T (U U^T)^+ 1`` with ``U U^T = D^-1 M D^-1`` (``D`` the gradient norms), hence
    ``d = w @ G`` with ``w = D^-1 c (1^T M D^-1 c) / (c^T U U^T c)``, ``c = (U U^T)^+ 1``. The
    pseudo-inverse drops eigenvalues below ``lambda_max * T * eps_float32`` (the Gramian squares
    the singular values of ``U``); a zero gradient has a zero unit vector, as in torchjd
    (``nan_to_num``). The paper's momentum variant (M-ConFIG, which updates one task's gradient
    per step) is not implemented. No hyper-parameters; heads get their plain gradients (torchjd's
    ``mtl_backward``). Stateless.
    """

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        M = M.cpu().double()
        T = M.shape[0]
        n = M.diagonal().clamp_min(0).sqrt()
        live = n > 1e-12 * max(float(n.max()), 1e-300)
        inv = torch.where(live, 1.0 / n.clamp_min(1e-300), torch.zeros_like(n))
        UU = inv[:, None] * M * inv[None, :]
        lam, V = torch.linalg.eigh(0.5 * (UU + UU.T))
        keep = lam > lam.max().clamp_min(0) * T * torch.finfo(torch.float32).eps
        if not bool(keep.any()):
            return torch.zeros(T, dtype=torch.float64)
        lam, V = lam[keep], V[:, keep]
        c = V @ ((V.T @ torch.ones(T, dtype=torch.float64)) / lam)
        vv = float(c @ UU @ c)  # ||v||^2
        if vv <= 0:
            return torch.zeros(T, dtype=torch.float64)
        a = inv * c  # v = G^T a
        length = float(torch.ones(T, dtype=torch.float64) @ M @ a)  # sum_t g_t . v
        return (a * (length / vv)).to(M)


@BALANCERS.register("config", help="ConFIG (Liu et al. 2025), equal cosine to every gradient")
def config(num_tasks: int, mode: str = "param", batched: bool = True) -> ConFIG:
    return ConFIG(num_tasks, mode, batched)
