"""Instance-based: reuse the other tasks' samples, weighted by their relevance to the target task.

Bickel, Bogojeska, Lengauer & Scheffer, "Multi-task learning for HIV therapy screening", ICML
2008 (Sec. 3, "distribution matching"). Pool the samples of all tasks; the pool follows the
mixture ``p(x, y) = Σ_s π_s p(x, y | s)``. The expected loss under target task t is the pool's
expected loss re-weighted by the density ratio::

    E_{(x,y) ~ p(·|t)}[ℓ] = E_{(x,y) ~ pool}[ r_t(x, y) ℓ ],   r_t(x, y) = p(x, y | t) / p(x, y)
                                                                        = p(t | x, y) / π_t

(Bayes' rule), so the ratio needs no density estimate: a probabilistic classifier that tells
the tasks apart, trained on the pool with each sample labelled by the task it came from, gives
``p(t | x, y)``, and π_t = n_t / N. Each task's model is then trained on the whole pool with
sample weights ``r_t`` (a weighted ℓ2-regularised linear model here, ridge or logistic, with its
strength cross-validated on the target task's own held-out samples). Samples that look like the
target task weigh up to ``1 / π_t``; samples the classifier is sure come from elsewhere weigh
nearly 0, so unrelated tasks are ignored rather than averaged in.

Choices of ours, where the paper leaves room or departs:

* The paper's discriminator is a kernel soft-max model with a task-similarity Gaussian prior;
  ours is a linear soft-max (multinomial logistic) regression with an ℓ2 prior whose strength
  is cross-validated by held-out log-likelihood, on features ``φ(x, y)``: for two classes
  ``[x·1(y=1), x·1(y=0), 1(y=1)]`` (a discriminator per class), for regression
  ``[x, y, y²]``; ``use_targets=False`` uses ``x`` alone (covariate-shift weights, the setting
  of Bickel, Brückner & Scheffer, "Discriminative learning under covariate shift", JMLR 2009).
* With ``standardize=True``, features and regression targets are standardised with pooled
  statistics: the method assumes the tasks share their output space, and a per-task scale
  would shift the targets of a task whose inputs are shifted. Tasks measured in different
  units (linnerud) are then told apart by the discriminator through ``y`` and weigh ~0 for
  each other.
* No code by the authors is public; this is written from the paper.

With a single task every weight is exactly 1 and the method is its own single-task baseline.
"""

from __future__ import annotations

import math
import warnings
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
    mean_loss,
    single_threaded,
)
from .linear import L2Linear, _Problem
from .solvers import Convergence, ConvergenceWarning, apg


def _log_softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(1, keepdims=True)
    return Z - np.log(np.exp(Z).sum(1, keepdims=True))


def fit_softmax(Phi: np.ndarray, labels: np.ndarray, n_classes: int, alpha: float,
                max_iter: int = 5000, tol: float = 1e-6) -> tuple[np.ndarray, Convergence]:
    """Multinomial logistic regression ``p(c | φ) ∝ exp(φ·v_c + b_c)`` with ``α/2 ||V||²``.

    Returns ``Θ = [V; b]`` ((p + 1) × classes). Solved by :func:`~.solvers.apg`; the Hessian of
    the mean cross-entropy is at most ``½ λ_max(Φ̃ᵀΦ̃) / N`` (Böhning, "Multinomial logistic
    regression algorithm", Ann. Inst. Stat. Math. 1992).
    """
    N, p = Phi.shape
    Pt = np.hstack([Phi, np.ones((N, 1))])
    onehot = np.eye(n_classes)[labels]

    def smooth(Theta: np.ndarray, grad: bool = True) -> tuple[float, np.ndarray | None]:
        logp = _log_softmax(Pt @ Theta)
        f = -float((logp * onehot).sum()) / N
        return (f, Pt.T @ (np.exp(logp) - onehot) / N) if grad else (f, None)

    def prox(V: np.ndarray, step: float) -> np.ndarray:
        out = V.copy()
        out[:p] /= 1.0 + step * alpha
        return out

    L = 0.5 * float(np.linalg.eigvalsh(Pt.T @ Pt / N)[-1])
    Theta0 = np.zeros((p + 1, n_classes))
    _, g0 = smooth(Theta0)
    return apg(smooth, prox, lambda Th: 0.5 * alpha * float(np.vdot(Th[:p], Th[:p])), Theta0, L,
               max_iter=max_iter, tol=tol, stationarity_scale=float(np.linalg.norm(g0)) or 1.0,
               what=f"task discriminator (alpha={alpha:.3g})")


class DistributionMatchingMTL(MultiTaskEstimator):
    """Instance-based multi-task learning by distribution matching (Bickel et al. 2008).

    Args:
        loss: ``"squared"`` (weighted ridge) or ``"logistic"`` (weighted ℓ2-logistic).
        alpha: ℓ2 strength of every task's model; ``None``: per task, by ``cv``-fold
            cross-validation on the task's own samples over ``n_alphas`` values.
        use_targets: the discriminator sees ``(x, y)`` (Bickel et al.) or ``x`` only.
        disc_alpha: ℓ2 strength of the discriminator; ``None``: chosen among ``disc_alphas``
            by held-out log-likelihood (``cv`` folds).
        standardize: scale features (pooled) and regression targets (per task).

    Fitted attributes: ``instance_weights_[t]`` (the weight r_t of every pooled sample, in the
    order of ``pool_task_``), ``pool_task_``, ``alpha_`` (per task), ``disc_alpha_``,
    ``convergence_`` (per task), ``discriminator_convergence_``.
    """

    def __init__(self, loss: str = "squared", alpha: float | None = None, n_alphas: int = 12,
                 cv: int = 3, use_targets: bool = True, disc_alpha: float | None = None,
                 disc_alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                 standardize: bool = True, max_iter: int = 5000, tol: float = 1e-4,
                 random_state: int = 0) -> None:
        self.loss = loss
        self.alpha = alpha
        self.n_alphas = n_alphas
        self.cv = cv
        self.use_targets = use_targets
        self.disc_alpha = disc_alpha
        self.disc_alphas = disc_alphas
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    # ----------------------------------------------------------------- weights
    def _features(self, Xz: np.ndarray, y: np.ndarray) -> np.ndarray:
        if not self.use_targets:
            return Xz
        if self.loss == "logistic":
            pos = y[:, None]
            return np.hstack([Xz * pos, Xz * (1.0 - pos), pos])
        return np.hstack([Xz, y[:, None], y[:, None] ** 2])

    def _weights(self, Phi: np.ndarray, task: np.ndarray, T: int) -> np.ndarray:
        """``r[t, i] = p̂(t | φ_i) / π_t`` for every task t and pooled sample i."""
        rng = np.random.default_rng(self.random_state)
        if self.disc_alpha is not None:
            self.disc_alpha_, self.disc_cv_loss_ = float(self.disc_alpha), None
        else:
            k = int(self.cv)
            folds = kfold(len(task), k, rng, task)
            losses = np.zeros((k, len(self.disc_alphas)))
            for f in range(k):
                tr, va = folds != f, folds == f
                for j, a in enumerate(self.disc_alphas):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        Th, _ = fit_softmax(Phi[tr], task[tr], T, float(a), self.max_iter)
                    logp = _log_softmax(np.hstack([Phi[va], np.ones((va.sum(), 1))]) @ Th)
                    losses[f, j] = -logp[np.arange(va.sum()), task[va]].mean()
            self.disc_cv_loss_ = losses
            self.disc_alpha_ = float(self.disc_alphas[int(np.argmin(losses.mean(0)))])
        Theta, self.discriminator_convergence_ = fit_softmax(Phi, task, T, self.disc_alpha_,
                                                             self.max_iter)
        post = np.exp(_log_softmax(np.hstack([Phi, np.ones((len(Phi), 1))]) @ Theta))
        prior = np.bincount(task, minlength=T) / len(task)
        return (post / prior).T

    # ----------------------------------------------------------------- fitting
    @single_threaded
    def fit(self, X_list: Sequence[Any], y_list: Sequence[Any],
            sample_weight: Sequence[Any] | None = None) -> DistributionMatchingMTL:
        check_loss(self.loss)
        Xs, ys_raw, ws = check_tasks(X_list, y_list, sample_weight)
        ys, self.classes_ = encode_targets(self.loss, ys_raw)
        if self.loss == "squared":
            self.classes_ = None
        T, d = len(Xs), Xs[0].shape[1]
        pooled = np.vstack(Xs)
        self.x_mean_ = pooled.mean(0) if self.standardize else np.zeros(d)
        sd = pooled.std(0) if self.standardize else np.ones(d)
        self.x_scale_ = np.where(sd > 0, sd, 1.0)
        # one scale for every task: pooled samples keep their place in the shared output space
        # (per-task centring would shift the targets of a task whose inputs are shifted)
        sq = self.standardize and self.loss == "squared"
        y_all = np.concatenate(ys)
        mean, sd = (y_all.mean(), y_all.std()) if sq else (0.0, 1.0)
        self.y_mean_ = np.full(len(ys), mean)
        self.y_scale_ = np.full(len(ys), sd if sd > 0 else 1.0)
        Xz = (pooled - self.x_mean_) / self.x_scale_
        yz = np.concatenate([(y - m) / s for y, m, s in zip(ys, self.y_mean_, self.y_scale_)])
        task = np.repeat(np.arange(T), [len(X) for X in Xs])
        base_w = np.ones(len(task)) if ws is None else np.concatenate(ws)
        self.pool_task_ = task
        self.n_features_in_, self.n_tasks_ = d, T

        if T == 1:
            r = np.ones((1, len(task)))
            self.disc_alpha_, self.disc_cv_loss_, self.discriminator_convergence_ = (
                math.nan, None, None)
        else:
            r = self._weights(self._features(Xz, yz), task, T)
        self.instance_weights_ = list(r)

        self.coef_ = np.zeros((d, T))
        self.intercept_ = np.zeros(T)
        self.alpha_, self.cv_loss_, self.convergence_ = [], [], []
        for t in range(T):
            w = r[t] * base_w
            if w.sum() <= 0:
                raise DataError(f"classic: every instance weight of task {t} is zero")
            theta, alpha, cv_loss, conv = self._fit_target(Xz, yz, w, task == t)
            self.alpha_.append(alpha)
            self.cv_loss_.append(cv_loss)
            self.convergence_.append(conv)
            W, b = theta[:d, 0], theta[d, 0]
            self.coef_[:, t] = W / self.x_scale_ * self.y_scale_[t]
            self.intercept_[t] = (b - (self.x_mean_ / self.x_scale_) @ W) * self.y_scale_[t] \
                + self.y_mean_[t]
        return self

    def _fit_target(self, Xz: np.ndarray, yz: np.ndarray, w: np.ndarray, own: np.ndarray
                    ) -> tuple[np.ndarray, float, np.ndarray | None, Convergence]:
        """The weighted single-task model of one target task (strength by CV on ``own``)."""
        solver = L2Linear(loss=self.loss, max_iter=self.max_iter, tol=self.tol)
        full = _Problem([Xz], [yz], [w], self.loss, True)
        if self.alpha is not None:
            alphas, cv_loss, best = np.array([float(self.alpha)]), None, 0
        else:
            a_max = solver._alpha_max(full)
            alphas = a_max * np.logspace(0, -5, self.n_alphas)
            k = int(self.cv)
            idx = np.flatnonzero(own)
            if len(idx) < k:
                raise DataError(f"classic: a task has {len(idx)} samples; cv={k} needs at least "
                                f"{k} (lower cv or give alpha)")
            rng = np.random.default_rng(self.random_state)
            folds = kfold(len(idx), k, rng, yz[idx] if self.loss == "logistic" else None)
            cv_loss = np.zeros((k, len(alphas)))
            for f in range(k):
                held = np.zeros(len(yz), dtype=bool)
                held[idx[folds == f]] = True
                prob = _Problem([Xz[~held]], [yz[~held]], [w[~held]], self.loss, True)
                for j, (Th, _) in enumerate(solver._path(prob, alphas)):
                    cv_loss[f, j] = mean_loss(self.loss, prob.scores(Th, 0, Xz[held]), yz[held])
            best = int(np.argmin(cv_loss.mean(0)))
        path = solver._path(full, alphas[: best + 1])
        theta, conv = path[-1]
        return theta, float(alphas[best]), cv_loss, conv

    def decision_function(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        Xs = self._check_fitted(X_list)
        return [X @ self.coef_[:, t] + self.intercept_[t] for t, X in enumerate(Xs)]
