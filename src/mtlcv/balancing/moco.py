"""MoCo: multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen,
ICLR 2023)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..registry import BALANCERS
from .base import GradientBalancer, _check_matrix, check_positive
from .solvers import project_simplex


class MoCo(GradientBalancer):
    """MoCo: MGDA on tracked gradients, so that the stochastic bias of MGDA's weights vanishes.

    Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach", ICLR 2023, Algorithm 1: each task's gradient is tracked by
    ``y_t <- y_t - beta_k (y_t - g_t)`` (``y = 0`` at the start), the weights by one projected
    gradient step on MGDA's problem over the tracked gradients,
    ``lambda <- Pi_simplex(lambda - gamma_k (Y Y^T + rho I) lambda)`` (``lambda = 1/T`` at the
    start),
    and the update is ``d = Y^T lambda`` with the new ``Y`` and ``lambda``;
    ``beta_k = beta / k^beta_sigma``, ``gamma_k = gamma / k^gamma_sigma`` at step ``k = 1, 2, ...``.

    Defaults are the authors' NYUv2 setting (github.com/heshandevaka/MoCo, ``run_moco.sh``):
    ``beta = 0.99``, ``gamma = 0.1``, constant rates (``beta_sigma = gamma_sigma = 0``),
    ``rho = 0``, raw gradients. LibMTL's port departs from the paper in three ways, available
    here as options: ``normalize=True`` rescales each gradient to ``L_t g_t / ||g_t||`` before
    tracking (LibMTL, after the authors' shared code), its default rates are ``beta = 0.5``,
    ``gamma = 0.1`` with ``beta_sigma = gamma_sigma = 0.5``, and it replaces the projection onto
    the simplex by a softmax (not offered: the paper's convergence proof is for the projection).
    The authors' code multiplies the update by T before writing it; we keep the paper's
    ``Y^T lambda``. Heads get their plain gradients. ``last_weights`` are ``lambda`` (weights of
    the *tracked* gradients, not of ``G``).

    State (in ``state_dict()``): the step count, ``lambda`` and ``Y`` (T x P, like DB-MTL's EMA;
    the method's memory floor). With ``mode="rep"`` the tracking runs over representation
    gradients and restarts whenever the batch shape changes.
    """

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.99,
        beta_sigma: float = 0.0,
        gamma: float = 0.1,
        gamma_sigma: float = 0.0,
        rho: float = 0.0,
        normalize: bool = False,
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        self.beta = check_positive(beta, "beta")
        self.beta_sigma = check_positive(beta_sigma, "beta_sigma", allow_zero=True)
        self.gamma = check_positive(gamma, "gamma", allow_zero=True)
        self.gamma_sigma = check_positive(gamma_sigma, "gamma_sigma", allow_zero=True)
        self.rho = check_positive(rho, "rho", allow_zero=True)
        self.normalize = bool(normalize)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("lambd", torch.full((num_tasks,), 1.0 / num_tasks,
                                                 dtype=torch.float64))
        self.y: torch.Tensor | None = None

    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        G = _check_matrix(G, self.num_tasks).detach()
        if self.normalize:
            if losses is None:
                raise ValueError("MoCo with normalize=True needs the losses")
            G = G / (G.norm(dim=1, keepdim=True) + 1e-8) * losses.detach().to(G)[:, None]
        if self.y is None or self.y.shape != G.shape:
            self.y = torch.zeros_like(G)
            self.steps.zero_()
            self.lambd.fill_(1.0 / self.num_tasks)
        self.y = self.y.to(G)
        self.steps += 1
        k = int(self.steps)
        self.y.sub_((self.beta / k**self.beta_sigma) * (self.y - G))
        Y = self.y.double()
        M = (Y @ Y.T).cpu().numpy() + self.rho * np.eye(self.num_tasks)
        lam = self.lambd.cpu().numpy()
        lam = project_simplex(lam - (self.gamma / k**self.gamma_sigma) * (M @ lam))
        self.lambd.copy_(torch.from_numpy(lam))
        self.last_weights = self.lambd.to(G)
        return self.last_weights @ self.y

    def get_extra_state(self) -> Any:
        return {"y": None if self.y is None else self.y.detach().cpu().clone()}

    def set_extra_state(self, state: Any) -> None:
        y = state.get("y") if isinstance(state, dict) else None
        self.y = None if y is None else y.to(self.steps.device)


@BALANCERS.register("moco", help="MoCo (Fernando et al. 2023), tracked-gradient MGDA")
def moco(
    num_tasks: int,
    beta: float = 0.99,
    beta_sigma: float = 0.0,
    gamma: float = 0.1,
    gamma_sigma: float = 0.0,
    rho: float = 0.0,
    normalize: bool = False,
    mode: str = "param",
    batched: bool = True,
) -> MoCo:
    return MoCo(num_tasks, beta, beta_sigma, gamma, gamma_sigma, rho, normalize, mode, batched)
