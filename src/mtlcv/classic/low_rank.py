"""Low-rank: trace-norm regularised multi-task linear models (a shared low-dimensional subspace).

The task weight vectors are encouraged to lie in a common low-dimensional subspace by the trace
(nuclear) norm of the weight matrix, the sum of its singular values, the convex envelope of
the rank on the spectral-norm unit ball::

    min_{W,b}  Σ_t Σ_i s_ti ℓ(x_ti·w_t + b_t, y_ti)  +  α ||W||_*,   ||W||_* = Σ_k σ_k(W)

* Ji & Ye, "An accelerated gradient method for trace norm minimization", ICML 2009: problem (1)
  with the multi-task loss of their Sec. 5; the proximal step is singular value thresholding
  (their Theorem 3.1) and the solver is their accelerated gradient method (Algorithm 2), with
  the same backtracking on the Lipschitz estimate.
* Pong, Tseng, Ji & Ye, "Trace norm regularization: reformulations, algorithms, and multi-task
  learning", SIAM J. Optim. 20(6), 2010: the same problem (their (1)), with the dual and the
  duality gap we report (Sec. 2).

The authors' MALSAR ``Least_Trace.m`` (Zhou, Chen & Ye 2011) sums the squared loss over
samples, has no intercept, and stops on the objective change; we average per task, fit
unpenalised intercepts, and stop on the duality gap (squared loss) or the gradient mapping.

Optimality (KKT): with W* = U Σ Vᵀ (rank r) and G = ∇_W f(W*), ``-G/α = U Vᵀ + Z`` with
``Uᵀ Z = 0``, ``Z V = 0`` and ``||Z||_2 <= 1``; ``tests/test_classic.py`` checks it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .linear import LinearMultiTask, Penalty


def prox_trace(V: np.ndarray, threshold: float) -> np.ndarray:
    """Proximal operator of ``threshold · ||·||_*``: singular value thresholding.

    ``argmin_W threshold ||W||_* + ||W - V||_F² / 2 = U max(Σ - threshold, 0) Vᵀ`` for the
    thin SVD ``V = U Σ Vᵀ`` (Cai, Candès & Shen, SIAM J. Optim. 2010, Theorem 2.1; Ji & Ye 2009,
    Theorem 3.1): singular values below ``threshold`` vanish, so the rank can only go down.
    """
    U, s, Vt = np.linalg.svd(V, full_matrices=False)
    s = np.maximum(s - threshold, 0.0)
    keep = s > 0
    return (U[:, keep] * s[keep]) @ Vt[keep]


def numerical_rank(W: np.ndarray, rtol: float = 1e-8) -> int:
    """Singular values above ``rtol ×`` the largest (W's exact zeros survive reconstruction
    only up to rounding)."""
    s = np.linalg.svd(W, compute_uv=False)
    return int((s > rtol * s[0]).sum()) if s.size and s[0] > 0 else 0


class TraceNorm(Penalty):
    """Ω(W) = ||W||_* (sum of singular values); its dual norm is the spectral norm."""

    def value(self, W: np.ndarray) -> float:
        return float(np.linalg.svd(W, compute_uv=False).sum())

    def prox(self, V: np.ndarray, step: float) -> np.ndarray:
        return prox_trace(V, step)

    def dual_norm(self, G: np.ndarray) -> float:
        return float(np.linalg.norm(G, 2))


class TraceNormMultiTask(LinearMultiTask):
    """Trace-norm regularised multi-task linear model (see the module docstring).

    Fitted attributes: ``coef_`` (features × tasks, original units), ``intercept_``, ``rank_``
    (the rank of W found), ``singular_values_``, ``alpha_``, ``path_`` (per α: held-out loss,
    rank, iterations), ``convergence_``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> u = rng.normal(size=8)
        >>> X = [rng.normal(size=(60, 8)) for _ in range(4)]
        >>> y = [(t + 1) * x @ u + 0.1 * rng.normal(size=60) for t, x in enumerate(X)]
        >>> TraceNormMultiTask(alpha=0.5, standardize=False).fit(X, y).rank_
        1
    """

    penalty = TraceNorm()

    def _structure(self, W: np.ndarray) -> dict[str, Any]:
        return {"rank": numerical_rank(W)}

    def _set_coef(self, Theta: np.ndarray) -> None:
        super()._set_coef(Theta)
        self.singular_values_ = np.linalg.svd(self.W_, compute_uv=False)
        self.rank_ = numerical_rank(self.W_)
