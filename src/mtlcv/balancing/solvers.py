"""Small solvers on the task Gramian ``M = G G^T`` (T x T), shared by the gradient methods.

Every problem here lives in the T-dimensional space of task weights, so it is solved on the CPU in
float64 NumPy, whatever the size of the network. No SciPy / CVXPY / quadprog: each solver is a
few lines of a textbook algorithm, with its optimality condition checked in the tests.

* :func:`min_norm_simplex`: ``argmin_{w in simplex} w^T M w``, the min-norm point of the convex
  hull of the task gradients (MGDA), by Wolfe's exact finite algorithm (Wolfe, "Finding the
  nearest point in a polytope", Math. Programming 1976).
* :func:`nonneg_qp`: ``argmin_{x >= 0} 1/2 x^T A x + b^T x`` for positive definite ``A``, by the
  Lawson-Hanson active-set method (Lawson & Hanson, "Solving Least Squares Problems", 1974,
  ch. 23, with A^T A replaced by A); UPGrad's projections onto the dual cone.
* :func:`project_simplex`: Euclidean projection onto the probability simplex (Duchi et al.,
  ICML 2008, Fig. 1).
* :func:`minimize_simplex`: accelerated projected gradient with backtracking (Beck & Teboulle,
  FISTA, 2009) for a smooth convex function on the simplex; CAGrad's inner problem.
* :func:`nash_bargaining`: the solution of ``M a = 1/a, a > 0`` (Nash-MTL) by damped Newton on the
  strictly convex ``1/2 a^T M a - sum log a``, whose gradient vanishes exactly there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def as_numpy(M: torch.Tensor) -> np.ndarray:
    """A detached float64 NumPy copy of ``M``, symmetrised (Gramians are, up to rounding)."""
    a = M.detach().to("cpu", torch.float64).numpy()
    return 0.5 * (a + a.T) if a.ndim == 2 else a


def min_norm_simplex(M: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """Weights ``w`` on the simplex minimising ``w^T M w`` (Wolfe's min-norm-point algorithm).

    ``M`` is the Gramian of the points (here the task gradients); only inner products are used.
    The algorithm keeps a set ``S`` of affinely independent points and the convex weights of the
    current point ``x``; a major cycle adds the point most opposed to ``x``, minor cycles move to
    the affine minimiser of ``S`` and drop points whose weight reaches zero. It terminates after
    finitely many steps with the exact minimiser (up to rounding).
    """
    T = M.shape[0]
    scale = max(float(np.max(np.diag(M))), 1e-300)
    w = np.zeros(T)
    if T == 1 or scale <= 1e-300:
        w[:] = 1.0 / T
        return w
    j = int(np.argmin(np.diag(M)))
    w[j] = 1.0
    S = [j]
    for _ in range(max_iter):
        Mw = M @ w
        xx = float(w @ Mw)
        k = int(np.argmin(Mw))
        # Wolfe's stopping rule: no point is further "below" x than x itself
        if xx - Mw[k] <= tol * scale or k in S:
            break
        S.append(k)
        for _minor in range(T + 1):
            a = _affine_minimizer(M, S)
            if np.all(a > 1e-14):
                w[:] = 0.0
                w[S] = a
                break
            ws = w[S]
            neg = a <= 1e-14
            theta = np.min(ws[neg] / np.maximum(ws[neg] - a[neg], 1e-300))
            ws = ws + theta * (a - ws)
            keep = ws > 1e-14
            w[:] = 0.0
            S = [s for s, kp in zip(S, keep) if kp]
            w[S] = ws[keep]
            w /= w.sum()
    return w


def _affine_minimizer(M: np.ndarray, S: list[int]) -> np.ndarray:
    """Weights (summing to 1) of the min-norm point of the affine hull of the points ``S``."""
    n = len(S)
    K = np.zeros((n + 1, n + 1))
    K[:n, :n] = M[np.ix_(S, S)]
    K[:n, n] = 1.0
    K[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    # lstsq: the bordered system is singular when points coincide; any minimiser will do
    sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
    return sol[:n]


def nonneg_qp(A: np.ndarray, b: np.ndarray, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """``argmin_{x >= 0} 1/2 x^T A x + b^T x`` for symmetric positive definite ``A``.

    Lawson-Hanson active set: start at ``x = 0``; free the coordinate whose gradient is most
    negative, solve the unconstrained problem on the free set, and step back to the boundary
    whenever a free coordinate would turn non-positive. Exact after finitely many steps.
    """
    n = b.shape[0]
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)
    scale = max(float(np.abs(b).max()), float(np.abs(A).max()), 1e-300)
    for _ in range(max_iter):
        grad = A @ x + b
        cand = np.where(~free & (grad < -tol * scale))[0]
        if cand.size == 0:
            break
        free[cand[np.argmin(grad[cand])]] = True
        for _inner in range(n + 1):
            F = np.where(free)[0]
            z = np.zeros(n)
            z[F] = np.linalg.solve(A[np.ix_(F, F)], -b[F])
            if np.all(z[F] > 0):
                x = z
                break
            bad = F[z[F] <= 0]
            alpha = np.min(x[bad] / np.maximum(x[bad] - z[bad], 1e-300))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
    return x


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{w >= 0, sum w = 1}`` (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, v.shape[0] + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def minimize_simplex(
    f: Callable[[np.ndarray], float],
    grad: Callable[[np.ndarray], np.ndarray],
    w0: np.ndarray,
    max_iter: int = 500,
    tol: float = 1e-12,
) -> np.ndarray:
    """Minimise a smooth convex ``f`` over the simplex (FISTA with backtracking and restarts)."""
    w = project_simplex(w0)
    y, t, L = w.copy(), 1.0, 1.0
    fw = f(w)
    for _ in range(max_iter):
        gy, fy = grad(y), f(y)
        while True:  # backtracking on the Lipschitz estimate L
            z = project_simplex(y - gy / L)
            d = z - y
            if f(z) <= fy + gy @ d + 0.5 * L * (d @ d) + 1e-15 * abs(fy):
                break
            L *= 2.0
        fz = f(z)
        if fz > fw:  # adaptive restart keeps the method monotone
            y, t = w.copy(), 1.0
            continue
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = z + ((t - 1.0) / t_next) * (z - w)
        done = np.abs(z - w).max() < tol or fw - fz <= tol * max(abs(fw), 1e-300)
        w, fw, t, L = z, fz, t_next, L * 0.9
        if done:
            break
    return w


def nash_bargaining(
    M: np.ndarray, a0: np.ndarray | None = None, max_iter: int = 20, tol: float = 1e-9
) -> tuple[np.ndarray, bool]:
    """Positive ``a`` with ``M a = 1/a`` (the Nash bargaining solution, Nash-MTL Theorem 5.1).

    ``a`` minimises the strictly convex ``f(a) = 1/2 a^T M a - sum_i log a_i`` (its gradient is
    ``M a - 1/a``), so damped Newton with Armijo backtracking that keeps ``a > 0`` converges
    globally and quadratically near the solution; the Hessian ``M + diag(1/a^2)`` is always
    positive definite. Returns ``(a, converged)``; no solution exists when a non-negative
    combination of the gradients vanishes (a Pareto-stationary point), and then ``converged`` is
    False after ``max_iter`` iterations.

    The method is invariant to the scale of ``M`` (``M -> s M`` maps the iterates to
    ``a / sqrt(s)``), so the unnormalised Gramian is solved as accurately as a normalised one.
    Near the solution the decrease of ``f`` falls below its rounding error before the residual
    reaches ``tol``; a full Newton step is then also accepted when it shrinks the relative
    residual ``|a_i (M a)_i - 1|`` (the quadratic phase), so ill-conditioned Gramians (two
    nearly opposite task gradients) converge instead of stalling at ~1e-8.
    """
    T = M.shape[0]
    a = np.ones(T) if a0 is None or not np.all(np.isfinite(a0)) or np.any(a0 <= 0) else a0.copy()
    # best start on the ray through a: f(s a) is minimal at s^2 a^T M a = T
    a *= np.sqrt(T / max(float(a @ M @ a), 1e-300))

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ M @ x) - float(np.log(x).sum())

    def residual(x: np.ndarray) -> float:
        return float(np.linalg.norm(x * (M @ x) - 1.0))

    fa = f(a)
    for _ in range(max_iter + 1):
        g = M @ a - 1.0 / a
        res = float(np.linalg.norm(g * a))  # relative residual |a_i (Ma)_i - 1|
        if res < tol:
            return a, True
        try:
            step = -np.linalg.solve(M + np.diag(1.0 / (a * a)), g)
        except np.linalg.LinAlgError:  # a -> infinity along a null direction of M
            break
        s = 1.0
        while np.any(a + s * step <= 0):
            s *= 0.5
        if s == 1.0 and res < 1e-3 and residual(a + step) < 0.5 * res:
            a = a + step  # quadratic phase: Newton's full step (see the docstring)
            fa = f(a)
            continue
        while s > 1e-12 and f(a + s * step) > fa + 1e-4 * s * float(g @ step):
            s *= 0.5
        a = a + s * step
        fa = f(a)
        if not np.all(np.isfinite(a)):
            break
    return a, False
