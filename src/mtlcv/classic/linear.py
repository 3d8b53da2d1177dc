"""Regularised multi-task linear models: the machinery shared by the ℓ2,1, trace-norm and ℓ2
estimators.

Every such model solves, for the weight matrix ``W = [w_1 … w_T]`` (features × tasks) and
unpenalised intercepts ``b``::

    min_{W,b}  Σ_t Σ_i s_ti ℓ(x_ti·w_t + b_t, y_ti)  +  α Ω(W),      Σ_i s_ti = 1 per task,

with a convex penalty Ω that couples the tasks (ℓ2,1: shared features; trace norm: a shared
low-dimensional subspace) or not (ℓ2: independent ridge / logistic models), by the accelerated
proximal gradient method of :mod:`.solvers`.

The strength α is either given, or chosen by K-fold cross-validation on a regularisation path
(scikit-learn's ``LassoCV`` recipe): ``n_alphas`` values from ``α_max`` (the smallest α whose
solution is W = 0: the dual norm of the gradient at W = 0 with optimal intercepts) down to
``alpha_min_ratio × α_max``, each fit warm-started from the previous one; the α with the lowest
mean held-out loss wins, and the path is refitted on all samples. ``path_`` keeps, for every α,
the held-out loss (mean and std over folds), the number of selected features or the rank, and
the iterations.

With ``standardize=True`` (default) the features are centred and scaled by their pooled mean and
standard deviation and, for the squared loss, each task's targets by theirs, so one α suits
tasks measured in different units; ``coef_`` and ``intercept_`` are given back in the original
units. Duality gaps are computed for the squared loss (see :func:`LinearMultiTask._gap`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError
from .base import (
    MultiTaskEstimator,
    check_loss,
    check_tasks,
    encode_targets,
    kfold,
    loss_curvature,
    loss_value_grad,
    mean_loss,
    single_threaded,
)
from .solvers import Convergence, apg


class Penalty:
    """A convex penalty Ω(W) on the (features × tasks) weight matrix."""

    #: None where α_max (the strength that zeroes W) is not defined (ℓ2)
    has_alpha_max = True

    def value(self, W: np.ndarray) -> float:
        raise NotImplementedError

    def prox(self, V: np.ndarray, step: float) -> np.ndarray:
        """``argmin_W step Ω(W) + ||W - V||² / 2``."""
        raise NotImplementedError

    def dual_norm(self, G: np.ndarray) -> float:
        """Ω*(G) = max <G, W> over Ω(W) <= 1."""
        raise NotImplementedError

    def dual_scale(self, G: np.ndarray, alpha: float) -> tuple[float, float]:
        """For the dual point θ = c·(weighted residuals) with X^T θ = c G: the scale c that
        makes it feasible, and the value of (αΩ)*(c G) (0 for a norm, whose conjugate is the
        indicator of the dual-norm ball of radius α)."""
        dn = self.dual_norm(G)
        return (1.0 if dn <= alpha else alpha / dn), 0.0


class L2(Penalty):
    """Ω(W) = ||W||_F² / 2: independent ridge (squared loss) or ℓ2-logistic models."""

    has_alpha_max = False

    def value(self, W: np.ndarray) -> float:
        return 0.5 * float(np.vdot(W, W))

    def prox(self, V: np.ndarray, step: float) -> np.ndarray:
        return V / (1.0 + step)

    def dual_scale(self, G: np.ndarray, alpha: float) -> tuple[float, float]:
        return 1.0, float(np.vdot(G, G)) / (2.0 * alpha)


class _Problem:
    """The smooth part of the objective on fixed data, in the solver's variables.

    The variable is ``Θ = [W; b]``, ``(d + 1) × T`` (``d × T`` without intercepts). The tasks'
    samples are stacked once (task by task), so that one call evaluates every task with a few
    array operations instead of a Python loop over tasks.
    """

    def __init__(self, Xs: list[np.ndarray], ys: list[np.ndarray], ss: list[np.ndarray],
                 loss: str, fit_intercept: bool) -> None:
        self.Xs, self.ys, self.loss, self.fit_intercept = Xs, ys, loss, fit_intercept
        self.ss = [s / s.sum() for s in ss]
        self.d, self.T = Xs[0].shape[1], len(Xs)
        self.X = np.vstack(Xs)
        self.y = np.concatenate(ys)
        self.s = np.concatenate(self.ss)
        self.task = np.repeat(np.arange(self.T), [len(X) for X in Xs])
        self.starts = np.concatenate([[0], np.cumsum([len(X) for X in Xs])[:-1]])
        # the Hessian is block-diagonal over tasks: its norm is the largest task's
        self.lipschitz = loss_curvature(loss) * max(
            float(np.linalg.eigvalsh(self._gram(X, s))[-1]) for X, s in zip(Xs, self.ss))

    def _gram(self, X: np.ndarray, s: np.ndarray) -> np.ndarray:
        Xt = np.hstack([X, np.ones((len(X), 1))]) if self.fit_intercept else X
        return Xt.T @ (s[:, None] * Xt)

    def scores(self, Theta: np.ndarray, t: int, X: np.ndarray | None = None) -> np.ndarray:
        X = self.Xs[t] if X is None else X
        z = X @ Theta[: self.d, t]
        return z + Theta[self.d, t] if self.fit_intercept else z

    def smooth(self, Theta: np.ndarray, grad: bool = True) -> tuple[float, np.ndarray | None]:
        d = self.d
        z = np.einsum("nd,dn->n", self.X, Theta[:d, self.task])
        if self.fit_intercept:
            z += Theta[d, self.task]
        f, dz = loss_value_grad(self.loss, z, self.y, self.s)
        if not grad:
            return f, None
        g = np.empty_like(Theta)
        g[:d] = np.add.reduceat(self.X * dz[:, None], self.starts, axis=0).T
        if self.fit_intercept:
            g[d] = np.add.reduceat(dz, self.starts)
        return f, g

    def start(self) -> np.ndarray:
        """W = 0 with each task's optimal intercept (weighted mean, or its logit)."""
        Theta = np.zeros((self.d + self.fit_intercept, self.T))
        if self.fit_intercept:
            for t, (y, s) in enumerate(zip(self.ys, self.ss)):
                m = float(np.dot(s, y))
                if self.loss == "logistic":
                    m = math.log(max(m, 1e-12) / max(1.0 - m, 1e-12))
                Theta[self.d, t] = m
        return Theta


class LinearMultiTask(MultiTaskEstimator):
    """Base of the penalised multi-task linear models (see the module docstring).

    Args:
        loss: ``"squared"`` (regression) or ``"logistic"`` (two classes per task).
        alpha: the strength α; ``None`` (default) chooses it by cross-validation on a path.
        n_alphas: points on the path.
        alpha_min_ratio: the path runs from α_max down to ``alpha_min_ratio × α_max``;
            ``None``: glmnet's default, 0.01 when a task has fewer samples than features (the
            solutions below it interpolate and the solver crawls), else 0.001.
        cv: folds (stratified by class for the logistic loss), split within every task.
        fit_intercept: unpenalised per-task intercepts.
        standardize: scale features (and squared-loss targets) before fitting.
        max_iter, tol: solver limits (see :func:`~mtlcv.classic.solvers.apg`): the duality
            gap (squared loss) or the gradient mapping (logistic loss) must fall below ``tol``
            times its value at W = 0 (scikit-learn's lasso uses the same 1e-4 on the gap).
        random_state: seeds the fold assignment.
    """

    penalty: Penalty

    def __init__(self, loss: str = "squared", alpha: float | None = None, n_alphas: int = 20,
                 alpha_min_ratio: float | None = None, cv: int = 3, fit_intercept: bool = True,
                 standardize: bool = True, max_iter: int = 5000, tol: float = 1e-4,
                 random_state: int = 0) -> None:
        self.loss = loss
        self.alpha = alpha
        self.n_alphas = n_alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    # ------------------------------------------------------------------ solving
    def _solve(self, prob: _Problem, alpha: float, Theta0: np.ndarray
               ) -> tuple[np.ndarray, Convergence]:
        d, pen = prob.d, self.penalty

        def prox(V: np.ndarray, step: float) -> np.ndarray:
            out = V.copy()
            out[:d] = pen.prox(V[:d], step * alpha)
            return out

        start = prob.start()
        f0, g0 = prob.smooth(start)
        gap = self._gap(prob, alpha) if self.loss == "squared" else None
        Theta, conv = apg(
            prob.smooth, prox, lambda Th: alpha * pen.value(Th[:d]), Theta0, prob.lipschitz,
            max_iter=self.max_iter, tol=self.tol, gap=gap,
            gap_scale=f0 + alpha * pen.value(start[:d]),
            stationarity_scale=float(np.linalg.norm(g0)) or 1.0,
            what=f"{type(self).__name__}(alpha={alpha:.3g})")
        if self.loss == "squared" and prob.fit_intercept:
            Theta = Theta.copy()  # the intercepts that are optimal for W (those of the gap)
            for t in range(prob.T):
                r = prob.ys[t] - prob.Xs[t] @ Theta[:d, t]
                Theta[d, t] = float(np.dot(prob.ss[t], r))
        return Theta, conv

    def _gap(self, prob: _Problem, alpha: float):
        """Duality gap of the squared-loss problem (a certificate: gap >= F(W) - F*).

        With D_t = diag(s_t) and residuals r_t = y_t - X_t w_t - b_t*(W) at the intercepts
        optimal for W, the dual point θ_t = c D_t r_t has the dual objective
        ``Σ_t [c r_tᵀ D_t y_t - c² r_tᵀ D_t r_t / 2] - (αΩ)*(c G)``, G = [X_tᵀ D_t r_t]_t, where
        c scales θ into the dual-feasible set (Ω*(cG) <= α for a norm). This is the Fenchel
        dual behind scikit-learn's lasso gap, with one design and intercept per task; at the
        optimum c = 1 and the gap is 0.
        """
        d, pen = prob.d, self.penalty

        def gap(Theta: np.ndarray) -> float:
            G = np.empty((d, prob.T))
            lin = quad = 0.0
            for t, (X, y, s) in enumerate(zip(prob.Xs, prob.ys, prob.ss)):
                r = y - X @ Theta[:d, t]
                if prob.fit_intercept:
                    r = r - float(np.dot(s, r))
                sr = s * r
                G[:, t] = X.T @ sr
                quad += float(np.dot(sr, r))
                lin += float(np.dot(sr, y))
            c, conj = pen.dual_scale(G, alpha)
            primal = 0.5 * quad + alpha * pen.value(Theta[:d])
            dual = c * lin - 0.5 * c * c * quad - conj
            return max(primal - dual, 0.0)

        return gap

    def _alpha_max(self, prob: _Problem) -> float:
        _, g0 = prob.smooth(prob.start())
        if self.penalty.has_alpha_max:
            # a hair above, so that rounding in the first prox step cannot let a row through
            return self.penalty.dual_norm(g0[: prob.d]) * (1.0 + 1e-9)
        # ℓ2: no finite strength zeroes W; start where the penalty dominates the curvature
        return 10.0 * prob.lipschitz

    def _path(self, prob: _Problem, alphas: np.ndarray) -> list[tuple[np.ndarray, Convergence]]:
        Theta, out = prob.start(), []
        for a in alphas:
            Theta, conv = self._solve(prob, float(a), Theta)
            out.append((Theta, conv))
        return out

    # ------------------------------------------------------------------ fitting
    def _prepare(self, Xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
        pooled = np.vstack(Xs)
        if self.standardize:
            self.x_mean_ = pooled.mean(0)
            scale = pooled.std(0)
            self.x_scale_ = np.where(scale > 0, scale, 1.0)
        else:
            self.x_mean_, self.x_scale_ = np.zeros(pooled.shape[1]), np.ones(pooled.shape[1])
        if self.standardize and self.loss == "squared":
            self.y_mean_ = np.array([y.mean() for y in ys])
            self.y_scale_ = np.array([y.std() if y.std() > 0 else 1.0 for y in ys])
        else:
            self.y_mean_, self.y_scale_ = np.zeros(len(ys)), np.ones(len(ys))

    def _transform(self, Xs: list[np.ndarray]) -> list[np.ndarray]:
        return [(X - self.x_mean_) / self.x_scale_ for X in Xs]

    @single_threaded
    def fit(self, X_list: Sequence[Any], y_list: Sequence[Any],
            sample_weight: Sequence[Any] | None = None) -> LinearMultiTask:
        check_loss(self.loss)
        Xs, ys_raw, ws = check_tasks(X_list, y_list, sample_weight)
        ys, self.classes_ = encode_targets(self.loss, ys_raw)
        if self.loss == "squared":
            self.classes_ = None
        ws = [np.ones(len(X)) for X in Xs] if ws is None else ws
        self._prepare(Xs, ys)
        Xz = self._transform(Xs)
        yz = [(y - m) / s for y, m, s in zip(ys, self.y_mean_, self.y_scale_)]
        prob = _Problem(Xz, yz, ws, self.loss, self.fit_intercept)
        self.n_features_in_, self.n_tasks_ = prob.d, prob.T

        if self.alpha is not None:
            if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
                raise DataError(f"classic: alpha must be a positive number, got {self.alpha!r}")
            alphas = np.array([float(self.alpha)])
            self.cv_loss_ = None
            best = 0
        else:
            a_max = self._alpha_max(prob)
            if a_max <= 0:  # nothing to explain (e.g. constant targets): W = 0 at any α
                a_max = 1.0
            ratio = self.alpha_min_ratio
            if ratio is None:
                ratio = 1e-2 if min(len(X) for X in Xs) < prob.d else 1e-3
            alphas = a_max * np.logspace(0, math.log10(ratio), self.n_alphas)
            self.cv_loss_ = self._cross_validate(Xz, yz, ws, alphas)
            best = int(np.argmin(self.cv_loss_.mean(0)))
        path = self._path(prob, alphas[: best + 1])
        Theta, self.convergence_ = path[-1]
        self.alphas_, self.alpha_ = alphas, float(alphas[best])
        self.path_ = [self._path_entry(float(a), Th, conv, i)
                      for i, (a, (Th, conv)) in enumerate(zip(alphas, path))]
        self._set_coef(Theta)
        return self

    def _cross_validate(self, Xz: list[np.ndarray], yz: list[np.ndarray],
                        ws: list[np.ndarray], alphas: np.ndarray) -> np.ndarray:
        k = int(self.cv)
        rng = np.random.default_rng(self.random_state)
        for t, X in enumerate(Xz):
            if len(X) < k:
                raise DataError(f"classic: task {t} has {len(X)} samples; cv={k} needs at "
                                f"least {k} (lower cv or give alpha)")
        folds = [kfold(len(y), k, rng, y if self.loss == "logistic" else None) for y in yz]
        losses = np.zeros((k, len(alphas)))
        for f in range(k):
            tr = [fo != f for fo in folds]
            va = [fo == f for fo in folds]
            prob = _Problem([X[m] for X, m in zip(Xz, tr)], [y[m] for y, m in zip(yz, tr)],
                            [w[m] for w, m in zip(ws, tr)], self.loss, self.fit_intercept)
            for j, (Theta, _) in enumerate(self._path(prob, alphas)):
                losses[f, j] = np.mean([
                    mean_loss(self.loss, prob.scores(Theta, t, X[m]), y[m], w[m])
                    for t, (X, y, w, m) in enumerate(zip(Xz, yz, ws, va)) if m.any()])
        return losses

    def _path_entry(self, alpha: float, Theta: np.ndarray, conv: Convergence, i: int
                    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"alpha": alpha, "iterations": conv.iterations,
                                 "converged": conv.converged, "objective": conv.objective}
        if self.cv_loss_ is not None:
            entry["cv_loss"] = float(self.cv_loss_[:, i].mean())
            entry["cv_loss_std"] = float(self.cv_loss_[:, i].std())
        entry.update(self._structure(Theta[: self.n_features_in_]))
        return entry

    def _structure(self, W: np.ndarray) -> dict[str, Any]:
        """What the penalty shapes (selected features, rank); nothing for ℓ2."""
        return {}

    def _set_coef(self, Theta: np.ndarray) -> None:
        d = self.n_features_in_
        self.W_ = Theta[:d].copy()  # in the solver's (standardised) units
        b = Theta[d] if self.fit_intercept else np.zeros(self.n_tasks_)
        self.coef_ = self.W_ / self.x_scale_[:, None] * self.y_scale_[None, :]
        self.intercept_ = (b - (self.x_mean_ / self.x_scale_) @ self.W_) * self.y_scale_ \
            + self.y_mean_

    def decision_function(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        Xs = self._check_fitted(X_list)
        return [X @ self.coef_[:, t] + self.intercept_[t] for t, X in enumerate(Xs)]

    def objective(self, X_list: Sequence[Any], y_list: Sequence[Any],
                  sample_weight: Sequence[Any] | None = None) -> float:
        """The training objective at the fitted W (in the solver's units), for checking."""
        Xs, ys_raw, ws = check_tasks(X_list, y_list, sample_weight, self.n_features_in_)
        ys, _ = encode_targets(self.loss, ys_raw)
        ws = [np.ones(len(X)) for X in Xs] if ws is None else ws
        yz = [(y - m) / s for y, m, s in zip(ys, self.y_mean_, self.y_scale_)]
        prob = _Problem(self._transform(Xs), yz, ws, self.loss, self.fit_intercept)
        Theta = np.vstack([self.W_, self._intercepts_solver()[None]]) if self.fit_intercept \
            else self.W_
        return prob.smooth(Theta)[0] + self.alpha_ * self.penalty.value(self.W_)

    def _intercepts_solver(self) -> np.ndarray:
        return (self.intercept_ - self.y_mean_) / self.y_scale_ + (
            self.x_mean_ / self.x_scale_) @ self.W_


class L2Linear(LinearMultiTask):
    """Independent ℓ2-regularised linear models: ridge regression (``loss="squared"``) or
    ℓ2-regularised logistic regression (``loss="logistic"``), with Ω(W) = ||W||_F² / 2.

    The penalty does not couple the tasks; ``PerTask(L2Linear())`` gives every task its own
    cross-validated strength, the reference single-task baseline of ``mtlcv classic``
    (Hoerl & Kennard, "Ridge regression", Technometrics 1970; le Cessie & van Houwelingen,
    "Ridge estimators in logistic regression", Applied Statistics 1992).
    """

    penalty = L2()
