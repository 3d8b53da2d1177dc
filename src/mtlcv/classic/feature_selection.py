"""Feature selection: multi-task feature learning with the ℓ2,1 norm (joint sparsity).

The tasks share *which* features matter: the penalty sums, over features, the Euclidean norm of
a feature's weights across tasks::

    min_{W,b}  Σ_t Σ_i s_ti ℓ(x_ti·w_t + b_t, y_ti)  +  α ||W||_{2,1},
    ||W||_{2,1} = Σ_j ||W_j,:||_2

(rows = features, columns = tasks). The ℓ2 norm inside a row lets the tasks share a feature at
no extra cost; the ℓ1 sum across rows drops whole features for every task at once.

* Argyriou, Evgeniou & Pontil, "Convex multi-task feature learning", Machine Learning 73(3),
  2008: problem (2.3)-(2.4) learns features U and a (2,1)-regularised A; with U fixed to the
  identity it is this feature selection problem (their Sec. 2). They square the norm
  (γ ||A||²_{2,1}); the squared and plain penalties give the same family of solutions (the
  optimality conditions match for α = 2γ ||W*||_{2,1}), and we use the plain norm of
* Obozinski, Taskar & Jordan, "Joint covariate selection and joint subspace selection for
  multiple classification problems", Statistics and Computing 20(2), 2010, eq. (2) (ℓ1/ℓ2
  regularisation).

Solver: accelerated proximal gradient (:mod:`.solvers`) whose proximal step is group soft
thresholding (:func:`prox_l21`), as in the authors' group's MALSAR ``Least_L21.m`` /
``Logistic_L21.m`` (Zhou, Chen & Ye 2011). MALSAR's squared loss sums over samples and has no
intercept; ours averages per task (like its logistic loss) and fits unpenalised intercepts.

Optimality (KKT): with G = ∇_W f(W*), every selected row j has ``G_j = -α W_j / ||W_j||`` and
every dropped row has ``||G_j|| <= α``; ``tests/test_classic.py`` checks both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .linear import LinearMultiTask, Penalty


def prox_l21(V: np.ndarray, threshold: float) -> np.ndarray:
    """Proximal operator of ``threshold · ||·||_{2,1}`` (rows are groups): group soft thresholding.

    ``argmin_W threshold Σ_j ||W_j||_2 + ||W - V||_F² / 2`` is, row by row,
    ``W_j = max(0, 1 - threshold / ||V_j||_2) V_j``: a row whose norm is at most ``threshold``
    becomes exactly zero, every other row shrinks towards zero along its own direction.
    """
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    shrink = np.maximum(0.0, 1.0 - threshold / np.maximum(norms, 1e-300))
    return shrink * V


class L21(Penalty):
    """Ω(W) = Σ_j ||W_j,:||_2; its dual norm is the largest row norm."""

    def value(self, W: np.ndarray) -> float:
        return float(np.linalg.norm(W, axis=1).sum())

    def prox(self, V: np.ndarray, step: float) -> np.ndarray:
        return prox_l21(V, step)

    def dual_norm(self, G: np.ndarray) -> float:
        return float(np.linalg.norm(G, axis=1).max())


class L21MultiTask(LinearMultiTask):
    """Multi-task feature selection with the ℓ2,1 norm (see the module docstring).

    Fitted attributes: ``coef_`` (features × tasks, original units), ``intercept_``,
    ``selected_features_`` (indices of the rows of W that are not zero), ``alpha_``,
    ``path_`` (per α: held-out loss, number of selected features, iterations), ``convergence_``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> X = [rng.normal(size=(40, 10)) for _ in range(3)]
        >>> y = [x[:, 0] - 2 * x[:, 1] + 0.1 * rng.normal(size=40) for x in X]
        >>> model = L21MultiTask(alpha=0.05).fit(X, y)
        >>> model.selected_features_.tolist()
        [0, 1]
    """

    penalty = L21()

    def _structure(self, W: np.ndarray) -> dict[str, Any]:
        return {"selected": int((np.linalg.norm(W, axis=1) > 0).sum())}

    def _set_coef(self, Theta: np.ndarray) -> None:
        super()._set_coef(Theta)
        self.selected_features_ = np.flatnonzero(np.linalg.norm(self.W_, axis=1) > 0)
