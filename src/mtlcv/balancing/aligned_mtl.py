"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer

SCALES = ("min", "median", "rmse")


class AlignedMTL(GradientBalancer):
    """Aligned-MTL: align the principal components of the gradient system (condition number 1).

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    sec. 4 / Algorithm 1: with the Gramian ``M = G G^T = V Lambda V^T`` (rank ``R``), the aligned
    gradients are ``G^ = B G`` with ``B = sigma V Lambda^{-1/2} V^T``, so that
    ``G^ G^^T = sigma^2 I`` on the span of the gradients: orthogonal task gradients of equal
    norm ``sigma``. The update is their sum ``d = 1^T B G``, i.e. the task weights ``B 1``; it has
    the same projection ``sigma^2`` on every aligned gradient. The scale ``sigma`` is the
    smallest singular value ``sqrt(lambda_R)`` (``"min"``, the paper's choice; ``"median"`` and
    ``"rmse"`` as in the official code). Eigenvalues below ``lambda_max * T * eps_float32`` count
    as zero (the official rank tolerance). No other hyper-parameters; ``mode="rep"`` gives the
    paper's Aligned-MTL-UB. Heads get their plain gradients. Stateless.
    """

    def __init__(
        self, num_tasks: int, scale: str = "min", mode: str | None = None, batched: bool = True
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        if scale not in SCALES:
            raise ConfigError(
                f"balancer.options.scale is {scale!r}; expected one of {', '.join(SCALES)}"
            )
        self.scale = scale

    def alignment(self, M: torch.Tensor) -> torch.Tensor:
        """The matrix ``B`` (T x T): the aligned gradients are ``B @ G``."""
        lam, V = torch.linalg.eigh(M.cpu())
        tol = lam.max().clamp_min(0) * M.shape[0] * torch.finfo(torch.float32).eps
        keep = lam > tol
        if not bool(keep.any()):
            return torch.zeros_like(M)
        lam, V = lam[keep], V[:, keep]
        if self.scale == "min":
            sigma = lam.min().sqrt()
        elif self.scale == "median":
            sigma = lam.median().sqrt()
        else:
            sigma = lam.mean().sqrt()
        return (sigma * (V / lam.sqrt()) @ V.T).to(M)

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return self.alignment(M).sum(0)


@BALANCERS.register("aligned-mtl", help="Aligned-MTL (Senushkin et al. 2023)")
def aligned_mtl(
    num_tasks: int, scale: str = "min", mode: str = "param", batched: bool = True
) -> AlignedMTL:
    return AlignedMTL(num_tasks, scale, mode, batched)
