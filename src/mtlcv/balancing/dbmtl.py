"""DB-MTL: Dual-Balancing Multi-Task Learning (Lin, Ye, Zhang & Kwok, 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer, _check_matrix, check_positive, weight_logs
from .jacobian import split_parameters


class DBMTL(GradientBalancer):
    """DB-MTL: balance loss scales with logs and gradient magnitudes with the largest norm.

    Lin et al., "Dual-Balancing for Multi-Task Learning", 2023, sec. 3, and the authors' LibMTL
    code:

    * loss-scale balancing: the per-task gradients are those of ``log(L_t + 1e-8)``;
    * an EMA of each task's gradient, ``ghat_t <- beta_k ghat_t + (1 - beta_k) g_t`` with
      ``beta_k = beta / k^sigma`` at step ``k = 1, 2, ...`` and ``ghat = 0`` before the first
      step (as in the authors' code), ``beta = 0.9`` and ``sigma = 0``, the defaults of the
      authors' code (median-research-group/LibMTL ``LibMTL/config.py``: ``--DB_beta 0.9``,
      ``--DB_beta_sigma 0``, a constant ``beta``); ``sigma = 0.5``, an earlier mtlcv default,
      is not confirmed by the paper;
    * gradient-magnitude balancing: ``d = sum_t alpha_t ghat_t`` with
      ``alpha_t = max_s ||ghat_s|| / ||ghat_t||``: every task contributes with the largest norm.

    ``aggregate(G)`` therefore expects ``G`` to hold gradients of the *log* losses (``backward``
    takes the logs itself); ``last_weights`` are the ``alpha_t`` (weights of the EMA gradients,
    not of ``G``). Heads get the plain gradient of their own log-loss (as in the authors' code).
    Defined in parameter space (``mode="param"``, exact); with ``mode="rep"`` the EMA runs over
    representation gradients and is reset whenever the batch shape changes.

    State (in ``state_dict()``): the step count and the EMA gradients ``ghat`` (T x P). On
    hard-sharing models ``backward`` folds each task's gradient into ``ghat`` as it is computed,
    so that ``G`` (another T x P) is never formed; ``ghat`` itself is the method's memory floor.
    """

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
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
        b = self._begin(G.shape, G)
        for t in range(self.num_tasks):
            self._fold(t, G[t], b)
        return self._combine()

    def _begin(self, shape: Sequence[int], like: torch.Tensor) -> float:
        """Start a step: the EMA (``shape``, with ``like``'s dtype and device), the step count,
        and ``beta_k``."""
        if self.ema is None or tuple(self.ema.shape) != tuple(shape):
            self.ema = like.new_zeros(shape)
            self.steps.zero_()
        self.ema = self.ema.to(like)
        self.steps += 1
        return self.beta / int(self.steps) ** self.beta_sigma

    def _fold(self, t: int, row: torch.Tensor, b: float, at: int = 0) -> None:
        """``ghat_t <- g_t + b (ghat_t - g_t)`` for columns ``at:at+len(row)``, in place."""
        assert self.ema is not None
        e = self.ema[t, at : at + row.numel()]
        e.sub_(row).mul_(b).add_(row)

    def _combine(self) -> torch.Tensor:
        assert self.ema is not None
        norms = self.ema.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        self.last_weights = alpha
        return alpha @ self.ema

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        """As :meth:`GradientBalancer.backward`, but each task's gradient is folded into the EMA
        as soon as it is computed (on hard-sharing models), so ``G`` is never formed."""
        from .jacobian import task_gradients

        if model is None:
            raise TypeError("DBMTL.backward needs the model")
        shared = split_parameters(model)[0]
        shape = (self.num_tasks, sum(p.numel() for p in shared))
        state: dict[str, float] = {}

        def fold(t: int, grads: Sequence[torch.Tensor | None]) -> None:
            if not state:
                like = next((g for g in grads if g is not None), losses)
                state["b"] = self._begin(shape, like.detach())
            i = 0
            for p, g in zip(shared, grads):
                if g is None:  # a zero gradient: ghat <- b ghat
                    self.ema[t, i : i + p.numel()].mul_(state["b"])  # type: ignore[index]
                else:
                    self._fold(t, g.detach().reshape(-1), state["b"], i)
                i += p.numel()

        from ..engine import distributed

        info: dict = {}
        # several processes: G is formed and all-reduced (tg.globalise) instead of folded
        tg = task_gradients(losses, model, self.mode, scale=self.loss_scale(losses),
                            batched=self.batched, safe=not self._batched_ok, info=info,
                            on_row=None if distributed.active() else fold)
        self._batched_ok = self._batched_ok or bool(info.get("batched"))
        tg.globalise()
        update = self.aggregate(tg.matrix) if tg.matrix is not None else self._combine()
        tg.apply(update, torch.ones(self.num_tasks, device=update.device, dtype=update.dtype))
        tg.synchronise(model)
        self.after_backward(model)
        return weight_logs(self.last_weights)

    def get_extra_state(self) -> Any:
        return {"ema": None if self.ema is None else self.ema.detach().cpu().clone()}

    def set_extra_state(self, state: Any) -> None:
        ema = state.get("ema") if isinstance(state, dict) else None
        self.ema = None if ema is None else ema.to(self.steps.device)


@BALANCERS.register("dbmtl", help="DB-MTL (Lin et al. 2023), log losses + max-norm gradients")
def dbmtl(
    num_tasks: int,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    mode: str = "param",
    batched: bool = True,
) -> DBMTL:
    return DBMTL(num_tasks, beta, beta_sigma, mode, batched)
