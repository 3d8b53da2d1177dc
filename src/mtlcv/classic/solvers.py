"""Accelerated proximal gradient (FISTA) for ``min_x f(x) + g(x)``, f smooth, g with a cheap prox.

One solver serves every convex estimator of :mod:`mtlcv.classic`: the ℓ2,1 (group soft
thresholding) and trace-norm (singular value thresholding) multi-task models, the ℓ2 single-task
references and the task discriminator of the instance-based method.

The iteration is FISTA of Beck & Teboulle, "A fast iterative shrinkage-thresholding algorithm
for linear inverse problems", SIAM J. Imaging Sci. 2(1), 2009, with the backtracking rule of
their Sec. 4 (the step 1/L is accepted when ``f(p) <= f(y) + <∇f(y), p - y> + L/2 ||p - y||²``,
else L doubles; L never decreases). It is also Algorithm 2 of Ji & Ye, "An accelerated
gradient method for trace norm minimization", ICML 2009, and the scheme of the authors' MALSAR
toolbox (Zhou, Chen & Ye 2011; ``Least_L21.m``, ``Least_Trace.m``). One addition: when the
objective goes up, the momentum is reset (the function-value restart of O'Donoghue & Candès,
"Adaptive restart for accelerated gradient schemes", Found. Comput. Math. 2015), which keeps
FISTA's rate and removes its oscillations on well-conditioned problems.

Convergence is reported, never assumed: the number of iterations, the relative change of the
objective in the last iteration, the norm of the gradient mapping ``L ||p - y||`` (zero exactly
at a minimiser; the first-order optimality residual) and, where the caller supplies one, a
duality gap (an upper bound on ``F(x) - F*``). The run stops when the gap falls below
``tol ×`` a scale of the problem, or, without a gap, when the gradient mapping falls below
``tol ×`` a scale of the gradient (the callers pass ``F`` and ``||∇f||`` at zero). MALSAR
stops on the objective change alone, which can stop early on a flat stretch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


class ConvergenceWarning(UserWarning):
    """A solver stopped at ``max_iter`` before meeting its tolerance."""


@dataclass
class Convergence:
    """How a fit ended: the numbers a user needs to trust (or distrust) a solution."""

    iterations: int
    converged: bool
    objective: float
    #: |F_k - F_{k-1}| / max(|F_k|, 1e-300) in the last iteration
    rel_change: float
    #: L ||p - y||: the norm of the gradient mapping, 0 exactly at a minimiser
    stationarity: float
    #: duality gap F(x) - D(θ) >= F(x) - F*, or NaN where no dual is used
    gap: float = math.nan

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def __str__(self) -> str:
        gap = "" if math.isnan(self.gap) else f", gap {self.gap:.2e}"
        state = "converged" if self.converged else "NOT converged"
        return (f"{state} in {self.iterations} iterations (objective {self.objective:.6g}, "
                f"change {self.rel_change:.1e}{gap})")


def apg(
    smooth: Callable[..., tuple[float, np.ndarray | None]],
    prox: Callable[[np.ndarray, float], np.ndarray],
    penalty: Callable[[np.ndarray], float],
    x0: np.ndarray,
    lipschitz: float,
    *,
    max_iter: int = 5000,
    tol: float = 1e-6,
    gap: Callable[[np.ndarray], float] | None = None,
    gap_every: int = 10,
    gap_scale: float | None = None,
    stationarity_scale: float | None = None,
    what: str = "apg",
) -> tuple[np.ndarray, Convergence]:
    """Minimise ``f(x) + g(x)`` from ``x0`` by FISTA with backtracking and restart.

    Args:
        smooth: ``(x, grad=True) -> (f(x), ∇f(x) or None)``; ``grad=False`` may skip the
            gradient (the line search only needs values).
        prox: ``(v, step) -> argmin_x g(x) + ||x - v||² / (2 step)``.
        penalty: ``x -> g(x)``.
        x0: the starting point (warm starts along a regularisation path).
        lipschitz: an estimate of the Lipschitz constant of ∇f (a bound makes backtracking
            unnecessary; a smaller value is doubled until the descent condition holds).
        tol: relative tolerance (see the module docstring).
        gap: ``x -> duality gap``, checked every ``gap_every`` iterations.
        gap_scale: the gap must fall below ``tol × gap_scale`` (default: ``F(x0)``).
        stationarity_scale: without a gap, the gradient mapping must fall below
            ``tol × stationarity_scale`` (default: its value in the first iteration; pass a
            problem scale such as ``||∇f(0)||`` to make warm starts stop as early as cold ones).
        what: a name for the warning issued when ``max_iter`` is reached.

    Returns:
        The last iterate and its :class:`Convergence`.
    """
    L = max(float(lipschitz), 1e-12)
    x = x0.copy()
    f_x, _ = smooth(x, grad=False)
    F_prev = f_x + penalty(x)
    scale = max(abs(F_prev) if gap_scale is None else gap_scale, 1e-300)
    y, t = x.copy(), 1.0
    stat0 = stationarity_scale
    rel, stat, g_val = math.inf, math.inf, math.nan
    converged = False
    k = 0
    for k in range(1, max_iter + 1):
        f_y, grad = smooth(y)
        while True:
            p = prox(y - grad / L, 1.0 / L)
            d = p - y
            f_p, _ = smooth(p, grad=False)
            # a tiny slack absorbs rounding when f is flat around y
            if f_p <= f_y + float(np.vdot(grad, d)) + 0.5 * L * float(np.vdot(d, d)) + (
                1e-12 * abs(f_y)
            ):
                break
            L *= 2.0
        F = f_p + penalty(p)
        stat = L * float(np.linalg.norm(d))
        stat0 = stat if stat0 is None else stat0
        rel = abs(F_prev - F) / max(abs(F), 1e-300)
        if F > F_prev:  # restart: drop the momentum that overshot
            x, y, t = p, p.copy(), 1.0
        else:
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = p + ((t - 1.0) / t_next) * (p - x)
            x, t = p, t_next
        F_prev = F
        if stat == 0.0:  # the prox step did not move: y is a fixed point, hence optimal
            converged = True
            break
        if gap is not None:
            if k % gap_every == 0:
                g_val = gap(x)
                if g_val <= tol * scale:
                    converged = True
                    break
        elif stat <= tol * stat0:
            converged = True
            break
    if gap is not None:
        g_val = gap(x)
        converged = converged or g_val <= tol * scale
    if not converged:
        warnings.warn(f"{what}: stopped at max_iter={max_iter} before reaching tol={tol} "
                      f"(gradient mapping {stat:.2e}, objective change {rel:.1e}); raise "
                      "max_iter or tol", ConvergenceWarning, stacklevel=3)
    f_x, _ = smooth(x, grad=False)
    return x, Convergence(k, converged, f_x + penalty(x), rel, stat, g_val)
