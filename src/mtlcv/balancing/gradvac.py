"""Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021)."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer, check_positive


class GradVac(GradientBalancer):
    """GradVac: pull each pair of task gradients towards an adaptive target cosine similarity.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, sec. 3 and its algorithm: for each task ``i`` and
    each other task ``j`` in random order, with ``phi_ij = cos(g_i', g_j)`` and the target
    ``phihat_ij`` (an EMA, init 0), if ``phi_ij < phihat_ij``:

    ``g_i' += ||g_i'|| (phihat sqrt(1 - phi^2) - phi sqrt(1 - phihat^2))
    / (||g_j|| sqrt(1 - phihat^2)) g_j``,

    which sets ``cos(g_i', g_j) = phihat_ij``; then
    ``phihat_ij <- (1 - beta) phihat_ij + beta phi_ij`` for every pair (the paper's algorithm
    updates the EMA unconditionally). The update is ``sum_i g_i'``. ``beta = 0.01`` is the
    paper's EMA rate. The paper also applies this per layer group; here the whole shared model
    is one group (LibMTL's default). Computed on the Gramian with coefficient tracking, like
    PCGrad; ``last_weights`` are the combination weights. Heads get their plain gradients.

    State (in ``state_dict()``): the targets ``phihat`` (T x T).
    """

    def __init__(
        self, num_tasks: int, beta: float = 0.01, mode: str | None = None, batched: bool = True
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        self.beta = check_positive(beta, "beta")
        if self.beta > 1:
            raise ConfigError(f"balancer.options.beta must be in (0, 1], got {beta!r}")
        self.register_buffer("target", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        T = M.shape[0]
        M = M.cpu()
        C = torch.eye(T, dtype=M.dtype)
        target = self.target.cpu().clone()
        for i in range(T):
            for j in torch.randperm(T).tolist():
                if j == i:
                    continue
                ni = float(C[i] @ M @ C[i]) ** 0.5 if float(C[i] @ M @ C[i]) > 0 else 0.0
                nj = float(M[j, j]) ** 0.5 if float(M[j, j]) > 0 else 0.0
                phi = float(C[i] @ M[:, j]) / (ni * nj + 1e-8)
                phi = max(-1.0, min(1.0, phi))
                tgt = float(target[i, j])
                if phi < tgt:
                    coef = ni * (tgt * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - tgt**2))
                    C[i, j] += coef / (nj * math.sqrt(1 - tgt**2) + 1e-8)
                target[i, j] = (1 - self.beta) * tgt + self.beta * phi
        self.target.copy_(target)
        return C.sum(0).to(M)


@BALANCERS.register("gradvac", help="Gradient Vaccine (Wang et al. 2021), beta = 0.01")
def gradvac(
    num_tasks: int, beta: float = 0.01, mode: str = "param", batched: bool = True
) -> GradVac:
    return GradVac(num_tasks, beta, mode, batched)
