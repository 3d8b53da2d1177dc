"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import BALANCERS
from .base import GradientBalancer, _check_matrix, check_positive


class ExcessMTL(GradientBalancer):
    """ExcessMTL: raise the weight of the tasks whose estimated *excess* risk is largest.

    He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024, Algorithm 1: the excess
    risk of task t (its distance to its own optimum, not its loss, so label noise does not
    attract weight) is estimated to second order as ``e_t = g_t^T H_t^-1 g_t`` with a diagonal
    Hessian approximation ``H_t = diag(sqrt(sum_k g_{t,k}^2 + 1e-7))`` accumulated over steps, as in
    AdaGrad; the loss weights follow exponentiated gradient ascent,
    ``w_t <- w_t exp(eta e_t / e_t^(1))`` normalised to sum T, where ``e^(1)`` are the first
    step's estimates (a per-task scale) and the weights stay 1 on that first step. The update is
    ``sum_t w_t g_t``; heads get ``w_t`` times their gradient (the official code backpropagates
    ``sum_t w_t L_t``). ``eta`` (``step_size``) = 1e-2 is the official default
    (``robust_step_size``, github.com/yifei-he/ExcessMTL, the code LibMTL adopted); we follow that
    code, whose "first epoch" flag is in fact the first step.

    State (in ``state_dict()``): the weights, ``e^(1)`` and the accumulated squared gradients
    (T x P, the method's memory floor). Defined in parameter space; ``mode="rep"`` accumulates
    over representation gradients and restarts whenever the batch shape changes.
    """

    scale_task_params = True

    def __init__(
        self, num_tasks: int, step_size: float = 1e-2, mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        self.step_size = check_positive(step_size, "step_size", allow_zero=True)
        self.register_buffer("w", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("initial", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.grad_sum: torch.Tensor | None = None

    def excess_risks(self, G: torch.Tensor) -> torch.Tensor:
        """Accumulate ``G**2`` and return ``e_t = sum_k g_{t,k}^2 / sqrt(acc_{t,k} + 1e-7)``."""
        if self.grad_sum is None or self.grad_sum.shape != G.shape:
            self.grad_sum = torch.zeros_like(G)
            self.started.fill_(False)
            self.w.fill_(1.0)
        self.grad_sum = self.grad_sum.to(G)
        self.grad_sum.add_(G * G)
        return ((G * G) / torch.sqrt(self.grad_sum + 1e-7)).sum(1).double()

    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        G = _check_matrix(G, self.num_tasks).detach()
        e = self.excess_risks(G).to(self.w.device)
        if not bool(self.started):
            self.initial.copy_(e)
            self.started.fill_(True)
        else:
            # a task whose first gradient vanished has no scale: its weight only renormalises
            r = torch.where(self.initial > 0, e / self.initial.clamp_min(1e-300),
                            torch.zeros_like(e))
            w = self.w * torch.exp(self.step_size * r)
            self.w.copy_(self.num_tasks * w / w.sum())
        self.last_weights = self.w.to(G)
        return self.last_weights @ G

    def get_extra_state(self) -> Any:
        return {"grad_sum": None if self.grad_sum is None else self.grad_sum.detach().cpu()}

    def set_extra_state(self, state: Any) -> None:
        g = state.get("grad_sum") if isinstance(state, dict) else None
        self.grad_sum = None if g is None else g.to(self.w.device)


@BALANCERS.register("excessmtl", help="ExcessMTL (He et al. 2024), excess-risk weights")
def excessmtl(
    num_tasks: int, step_size: float = 1e-2, mode: str = "param", batched: bool = True
) -> ExcessMTL:
    return ExcessMTL(num_tasks, step_size, mode, batched)
