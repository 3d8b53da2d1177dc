"""FairGrad: fair resource allocation in multi-task learning (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..registry import BALANCERS
from .base import GradientBalancer, check_positive, clip_shared
from .solvers import as_numpy


def alpha_fair_weights(
    M: np.ndarray, alpha: float, w0: np.ndarray | None = None, max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[np.ndarray, bool]:
    """Positive ``w`` with ``M w = w^(-1/alpha)`` (FairGrad's optimality condition).

    ``w`` is the minimiser of the strictly convex ``f(w) = 1/2 w^T M w - sum_i h(w_i)`` with
    ``h'(w) = w^(-1/alpha)`` (``h = log`` for ``alpha = 1``, ``w^(1-1/alpha) / (1 - 1/alpha)``
    otherwise; ``h`` is strictly concave for ``alpha > 0``), so damped Newton with Armijo
    backtracking that keeps ``w > 0`` converges to it; the Hessian ``M + diag(w^(-1/alpha-1) /
    alpha)`` is positive definite. ``alpha = 1`` is Nash-MTL's ``M w = 1/w``. Returns
    ``(w, converged)``; no solution exists when a non-negative combination of the gradients
    vanishes, and then the last iterate comes back with ``converged = False``.
    """
    T = M.shape[0]
    p = 1.0 / alpha
    w = np.ones(T) / T if w0 is None else np.asarray(w0, dtype=float).copy()
    # best start on the ray through w: s^2 w^T M w = s^(1-p) sum w^(1-p)  ->  scale s
    q = float(w @ M @ w)
    if q > 1e-300:
        w *= (float((w ** (1 - p)).sum()) / q) ** (1.0 / (1.0 + p))

    def h(x: np.ndarray) -> float:
        return float(np.log(x).sum()) if alpha == 1 else float((x ** (1 - p)).sum() / (1 - p))

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ M @ x) - h(x)

    fw = f(w)
    for _ in range(max_iter):
        g = M @ w - w ** (-p)
        if np.linalg.norm(g * w) <= tol * max(1.0, float(np.abs(w ** (1 - p)).max())):
            return w, True
        H = M + np.diag(p * w ** (-p - 1))
        try:
            step = -np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            break
        s = 1.0
        while np.any(w + s * step <= 0):
            s *= 0.5
        while s > 1e-14 and f(w + s * step) > fw + 1e-4 * s * float(g @ step):
            s *= 0.5
        w = w + s * step
        fw = f(w)
        if not np.all(np.isfinite(w)):
            break
    return w, False


class FairGrad(GradientBalancer):
    """FairGrad: the update that maximises the alpha-fair utility of the tasks' improvements.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, sec. 3: with the
    utilities ``u_t = g_t . d`` (each task's first-order loss decrease), maximise
    ``sum_t u_t^(1-alpha) / (1 - alpha)`` (``sum_t log u_t`` for ``alpha = 1``) within a ball;
    the solution is ``d = G^T w`` with ``(G G^T w)_t = w_t^(-1/alpha)``, i.e. utilities
    ``u_t = w_t^(-1/alpha) > 0`` for every task. ``alpha = 1`` is proportional fairness (the
    Nash-MTL condition), ``alpha -> inf`` max-min fairness (the utilities become equal); larger
    ``alpha`` favours the task that improves least. The official code
    (github.com/OptMN-Lab/fairgrad, as LibMTL's port) solves the condition with SciPy's
    ``least_squares`` from ``w = 1/T``; here it is solved exactly by damped Newton on a convex
    potential (:func:`alpha_fair_weights`), checked against the condition in the tests.

    Defaults: ``alpha = 2.0``, the authors' setting for NYUv2 and Cityscapes (their
    ``run.sh``; the code's generic default, and LibMTL's, is 1.0); ``max_norm = 1.0``: the
    official code clips the shared gradient to norm 1 (0 disables). The official code also
    multiplies the shared update by T before clipping ("to match the sum loss"); we keep the
    paper's ``d = G^T w``. Heads get their plain gradients (the official code overwrites only the
    shared parameters' gradients; LibMTL backpropagates ``sum_t w_t L_t`` instead). A task whose
    shared gradient vanishes gets weight 0; when no solution exists (a non-negative combination of
    the gradients vanishes) the last Newton iterate is used. Stateless.
    """

    def __init__(
        self,
        num_tasks: int,
        alpha: float = 2.0,
        max_norm: float = 1.0,
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        self.alpha = check_positive(alpha, "alpha")
        self.max_norm = check_positive(max_norm, "max_norm", allow_zero=True)

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        A = as_numpy(M)
        d = np.diag(A)
        live = d > 1e-12 * max(float(d.max()), 1e-300)
        w = np.zeros(A.shape[0])
        if live.any():
            w[live] = alpha_fair_weights(A[np.ix_(live, live)], self.alpha)[0]
        return torch.from_numpy(w).to(M)

    def after_backward(self, model: nn.Module) -> None:
        clip_shared(model, self.max_norm)


@BALANCERS.register("fairgrad", help="FairGrad (Ban & Ji 2024), alpha-fair utilities, alpha = 2")
def fairgrad(
    num_tasks: int,
    alpha: float = 2.0,
    max_norm: float = 1.0,
    mode: str = "param",
    batched: bool = True,
) -> FairGrad:
    return FairGrad(num_tasks, alpha, max_norm, mode, batched)
