"""PCGrad: gradient surgery (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020)."""

from __future__ import annotations

import torch

from ..registry import BALANCERS
from .base import GradientBalancer


class PCGrad(GradientBalancer):
    """Project conflicting gradients.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each
    task ``i``, ``g_i^PC = g_i``; for every other task ``j`` in random order, if
    ``g_i^PC . g_j < 0`` then ``g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j`` (projection onto the
    normal plane of the *original* ``g_j``); the update is ``sum_i g_i^PC`` (the paper's sum; no
    hyper-parameters). Each ``g_i^PC`` is tracked as coefficients over the original gradients,
    so the whole procedure runs on the Gramian (as in torchjd) and ``last_weights`` are the
    resulting combination weights. With T = 2 the update has a non-negative inner product with
    both gradients. Orders come from the global torch generator. Heads get their plain
    gradients. Stateless.
    """

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        T = M.shape[0]
        C = torch.eye(T, dtype=M.dtype)
        M = M.cpu()
        for i in range(T):
            for j in torch.randperm(T).tolist():
                if j == i or M[j, j] <= 0:
                    continue
                dot = C[i] @ M[:, j]
                if dot < 0:
                    C[i, j] -= dot / M[j, j]
        return C.sum(0)


@BALANCERS.register("pcgrad", help="PCGrad (Yu et al. 2020), project conflicting gradients")
def pcgrad(num_tasks: int, mode: str = "param", batched: bool = True) -> PCGrad:
    return PCGrad(num_tasks, mode, batched)
