"""DB-MTL: Dual-Balancing Multi-Task Learning (Lin, Ye, Zhang & Kwok, 2023)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer, _check_matrix, check_positive


class DBMTL(GradientBalancer):
    """DB-MTL: balance loss scales with logs and gradient magnitudes with the largest norm.

    Lin et al., "Dual-Balancing for Multi-Task Learning", 2023, sec. 3, and the authors' LibMTL
    code:

    * loss-scale balancing: the per-task gradients are those of ``log(L_t + 1e-8)``;
    * an EMA of each task's gradient, ``ghat_t <- beta_k ghat_t + (1 - beta_k) g_t`` with
      ``beta_k = beta / k^sigma`` at step ``k = 1, 2, ...`` and ``ghat = 0`` before the first
      step (as in the authors' code), ``beta = 0.9`` and ``sigma = 0.5`` (the authors' defaults);
    * gradient-magnitude balancing: ``d = sum_t alpha_t ghat_t`` with
      ``alpha_t = max_s ||ghat_s|| / ||ghat_t||``: every task contributes with the largest norm.

    ``aggregate(G)`` therefore expects ``G`` to hold gradients of the *log* losses (``backward``
    takes the logs itself); ``last_weights`` are the ``alpha_t`` (weights of the EMA gradients,
    not of ``G``). Heads get the plain gradient of their own log-loss (as in the authors' code).
    Defined in parameter space (``mode="param"``, exact); with ``mode="rep"`` the EMA runs over
    representation gradients and is reset whenever the batch shape changes.

    State (in ``state_dict()``): the step count and the EMA gradients ``ghat`` (T x P).
    """

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        self.beta = check_positive(beta, "beta", allow_zero=True)
        if self.beta >= 1:
            raise ConfigError(f"balancer.options.beta must be in [0, 1), got {beta!r}")
        self.beta_sigma = check_positive(beta_sigma, "beta_sigma", allow_zero=True)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.ema: torch.Tensor | None = None

    def loss_scale(self, losses: torch.Tensor) -> torch.Tensor:
        # grad log(L + 1e-8) = grad L / (L + 1e-8)
        return 1.0 / (losses.detach() + 1e-8)

    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        G = _check_matrix(G, self.num_tasks).detach()
        if self.ema is None or self.ema.shape != G.shape:
            self.ema = torch.zeros_like(G)
            self.steps.zero_()
        self.steps += 1
        b = self.beta / int(self.steps) ** self.beta_sigma
        # G + b (ema - G), in place: no T x P temporaries
        self.ema = self.ema.to(G).sub_(G).mul_(b).add_(G)
        norms = self.ema.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        self.last_weights = alpha
        return alpha @ self.ema

    def get_extra_state(self) -> Any:
        return {"ema": None if self.ema is None else self.ema.detach().cpu().clone()}

    def set_extra_state(self, state: Any) -> None:
        ema = state.get("ema") if isinstance(state, dict) else None
        self.ema = None if ema is None else ema.to(self.steps.device)


@BALANCERS.register("dbmtl", help="DB-MTL (Lin et al. 2023), log losses + max-norm gradients")
def dbmtl(
    num_tasks: int,
    beta: float = 0.9,
    beta_sigma: float = 0.5,
    mode: str = "param",
    batched: bool = True,
) -> DBMTL:
    return DBMTL(num_tasks, beta, beta_sigma, mode, batched)
