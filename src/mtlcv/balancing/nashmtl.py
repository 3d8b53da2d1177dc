"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer, check_positive, clip_shared, weight_logs
from .solvers import as_numpy, nash_bargaining


class NashMTL(GradientBalancer):
    """Nash-MTL: the update ``d = sum_t alpha_t g_t`` with ``G G^T alpha = 1/alpha``, ``alpha > 0``.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, sec. 5, Theorem 5.1:
    the Nash bargaining solution within the unit ball is ``d = G^T alpha`` with ``alpha``
    solving ``(G G^T) alpha = 1/alpha`` (so every task's utility ``g_t . d = 1/alpha_t > 0``).
    The paper approximates it by a sequence of convex problems solved with CVXPY (sec. 5.1);
    here the condition is solved directly: it is the stationarity condition of the strictly
    convex ``1/2 a^T M a - sum log a``, minimised by damped Newton (solvers.py), warm-started
    from the previous ``alpha`` as in the official code.

    Published defaults: ``update_weights_every = 1``; ``optim_niter = 20`` (the official number
    of convex-approximation iterations; here the cap on Newton iterations, which converge in far
    fewer); ``max_norm = 1.0``: the official code clips the shared gradient to norm 1 after
    ``backward`` (AvivNavon/nash-mtl, ``methods/weight_methods.py``, ``NashMTL.backward``).

    The solution is the official one. The official code divides ``G G^T`` by its Frobenius norm
    ``n`` before solving, but its CVXPY constraint ``-log(alpha_i n) - log((G G^T / n alpha)_i)
    <= 0`` is ``alpha_i (G G^T alpha)_i >= 1`` on the *unnormalised* Gramian, and its objective
    makes that constraint tight: the ``alpha`` it returns (and uses as the loss weights) is the
    exact solution of Theorem 5.1 for ``G G^T``, whose shared update has ``||d||^2 = alpha^T G G^T
    alpha = T`` before clipping. That is what is computed here (the scale-invariant Newton solve
    needs no normalisation). An earlier ``normalize`` option that used the ``alpha`` of the
    normalised Gramian as is (``sqrt(n)`` times the official weights, so a shared step of norm
    ``sqrt(n T)`` and time-varying head scales) was removed: it matched neither the paper nor the
    code. Heads get ``alpha_t`` times their gradient (the official code backpropagates ``sum_t
    alpha_t L_t``). Degenerate cases: a task whose shared gradient vanishes cannot bargain and
    gets the mean weight of the others; when no solution exists (a non-negative combination of
    the gradients vanishes) the previous ``alpha`` is kept, as the official code does when its
    solver fails.

    What is shared is the model's declaration (``shared_parameters``): with MTAN, the official
    Nash-MTL code counts the attention masks as shared (in the Gramian and in the clip), which
    ``model.options.attention_params: shared`` reproduces (see ``configs/nyuv2/published``).

    State (in ``state_dict()``): the last ``alpha`` (the warm start, and the weights reused
    between updates) and the step count.
    """

    scale_task_params = True

    def __init__(
        self,
        num_tasks: int,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        max_norm: float = 1.0,
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        if int(update_weights_every) < 1 or int(optim_niter) < 1:
            raise ConfigError(
                "balancer.options.update_weights_every and optim_niter must be >= 1, got "
                f"{update_weights_every!r} and {optim_niter!r}"
            )
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self.max_norm = check_positive(max_norm, "max_norm", allow_zero=True)
        self.register_buffer("alpha", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        step = int(self.steps)
        self.steps += 1
        if step % self.update_weights_every:
            return self.alpha.to(M)
        A = as_numpy(M)
        # tasks without a shared gradient cannot bargain (their row of M a = 1/a has no solution)
        live = np.diag(A) > 1e-12 * max(float(np.diag(A).max()), 1e-300)
        alpha = self.alpha.cpu().numpy().copy()
        if live.any():
            prev = alpha[live] if step > 0 else None
            a, ok = nash_bargaining(A[np.ix_(live, live)], prev, max_iter=self.optim_niter)
            # like the official code, keep the previous alpha when the solver fails (at a
            # Pareto-stationary point no solution exists)
            if ok:
                alpha[live] = a
            alpha[~live] = alpha[live].mean()
        else:
            alpha[:] = 1.0
        self.alpha.copy_(torch.from_numpy(alpha))
        return self.alpha.to(M)

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        if int(self.steps) % self.update_weights_every == 0:
            return super().backward(losses, model)
        # between updates the official code reuses alpha without computing any gradient matrix
        self.steps += 1
        self.last_weights = self.alpha.to(losses)
        (self.last_weights * losses).sum().backward()
        self.sync_gradients(model)
        if model is not None:
            self.after_backward(model)
        return weight_logs(self.last_weights)

    def after_backward(self, model: nn.Module) -> None:
        clip_shared(model, self.max_norm)


@BALANCERS.register("nashmtl", help="Nash-MTL (Navon et al. 2022), bargaining solution")
def nashmtl(
    num_tasks: int,
    update_weights_every: int = 1,
    optim_niter: int = 20,
    max_norm: float = 1.0,
    mode: str = "param",
    batched: bool = True,
) -> NashMTL:
    return NashMTL(num_tasks, update_weights_every, optim_niter, max_norm, mode, batched)
