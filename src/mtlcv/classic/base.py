"""The estimator contract of :mod:`mtlcv.classic`, shared by every family.

A classic multi-task estimator follows scikit-learn's conventions, with one array per task:

* ``fit(X_list, y_list, sample_weight=None)``: ``X_list[t]`` is ``[n_t, d]`` (every task has the
  same ``d`` features, not necessarily the same samples), ``y_list[t]`` is ``[n_t]``: real values
  for ``loss="squared"``, two classes for ``loss="logistic"``; ``sample_weight[t]`` (optional)
  is ``[n_t]`` non-negative. Returns ``self``.
* ``predict(X_list)``: one array per task (values, or class labels for the logistic loss);
  ``decision_function(X_list)``: raw scores; ``predict_proba(X_list)``: P(second class) per task.
* ``score(X_list, y_list)``: the mean over tasks of R² (squared) or accuracy (logistic).
* ``convergence_``: how the final fit ended (:class:`~mtlcv.classic.solvers.Convergence`).

Every task's loss is a (weighted) mean over its samples and the task losses are summed, so a
task with many samples does not drown one with few (the convention of MALSAR's logistic
models; its squared-loss models sum instead, which only rescales the strength).

:class:`PerTask` turns any of them into independent single-task models of the same family, the
baseline a multi-task method must beat.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone

from ..errors import DataError

LOSSES = ("squared", "logistic")

F = TypeVar("F", bound=Callable[..., Any])


def single_threaded(fit: F) -> F:
    """Run a fit with BLAS and PyTorch on one thread.

    These problems are far too small to gain from a thread team, and on a busy machine an
    idle-spinning BLAS team makes them several times slower (measured: an L-BFGS fit of the
    multi-task network on linnerud took 5.8 s with OpenBLAS's default threads and 1.2 s with
    one, on a loaded 2-core machine).
    """

    @functools.wraps(fit)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from threadpoolctl import threadpool_limits

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(limits=1):
                return fit(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), without overflow for large |z|."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def loss_value_grad(loss: str, z: np.ndarray, y: np.ndarray, s: np.ndarray
                    ) -> tuple[float, np.ndarray]:
    """Weighted loss ``Σ s_i ℓ(z_i, y_i)`` and its derivative in ``z``.

    Squared: ``ℓ = (y - z)² / 2``. Logistic with ``y`` in {0, 1}: ``ℓ = log(1 + exp(-ỹ z))``,
    ``ỹ = 2y - 1``, written with ``logaddexp`` so that it never overflows.
    """
    if loss == "squared":
        r = z - y
        return 0.5 * float(np.dot(s, r * r)), s * r
    return float(np.dot(s, np.logaddexp(0.0, -(2.0 * y - 1.0) * z))), s * (sigmoid(z) - y)


def loss_curvature(loss: str) -> float:
    """A bound on ℓ'' (1 for the squared loss, 1/4 for the logistic loss)."""
    return 1.0 if loss == "squared" else 0.25


def mean_loss(loss: str, z: np.ndarray, y: np.ndarray, s: np.ndarray | None = None) -> float:
    """The (weighted) mean loss, used to compare strengths on held-out samples."""
    s = np.full(len(y), 1.0 / len(y)) if s is None else s / s.sum()
    return loss_value_grad(loss, z, y, s)[0]


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise DataError(f"classic: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return loss


def check_tasks(X_list: Sequence[Any], y_list: Sequence[Any] | None = None,
                sample_weight: Sequence[Any] | None = None, n_features: int | None = None,
                ) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]:
    """Validate per-task arrays; one-line :class:`~mtlcv.errors.DataError` naming the problem."""
    if isinstance(X_list, np.ndarray) or not isinstance(X_list, Sequence) or not X_list:
        raise DataError("classic: X_list must be a non-empty list with one [n_t, d] array per "
                        f"task, got {type(X_list).__name__}")
    Xs = []
    for t, X in enumerate(X_list):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
            raise DataError(f"classic: X_list[{t}] has shape {X.shape}, expected [n_t, d] with "
                            "n_t, d >= 1")
        if not np.isfinite(X).all():
            raise DataError(f"classic: X_list[{t}] holds NaN or infinite values")
        Xs.append(X)
    d = Xs[0].shape[1] if n_features is None else n_features
    for t, X in enumerate(Xs):
        if X.shape[1] != d:
            raise DataError(f"classic: X_list[{t}] has {X.shape[1]} features, expected {d} "
                            "(every task has the same features)")
    ys = None
    if y_list is not None:
        if len(y_list) != len(Xs):
            raise DataError(f"classic: X_list has {len(Xs)} tasks but y_list has {len(y_list)}")
        ys = []
        for t, (X, y) in enumerate(zip(Xs, y_list)):
            y = np.asarray(y)
            if y.shape != (X.shape[0],):
                raise DataError(f"classic: y_list[{t}] has shape {y.shape}, expected "
                                f"({X.shape[0]},) to match X_list[{t}]")
            ys.append(y)
    ws = None
    if sample_weight is not None:
        if len(sample_weight) != len(Xs):
            raise DataError(f"classic: sample_weight has {len(sample_weight)} tasks, expected "
                            f"{len(Xs)}")
        ws = []
        for t, (X, w) in enumerate(zip(Xs, sample_weight)):
            w = np.asarray(w, dtype=np.float64)
            if w.shape != (X.shape[0],) or not np.isfinite(w).all() or (w < 0).any() or (
                    w.sum() <= 0):
                raise DataError(f"classic: sample_weight[{t}] must be {X.shape[0]} finite "
                                "non-negative values with a positive sum")
            ws.append(w)
    return Xs, ys, ws


def encode_targets(loss: str, ys: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Float targets for the solvers and, for the logistic loss, each task's two classes."""
    if loss == "squared":
        out = []
        for t, y in enumerate(ys):
            try:
                y = y.astype(np.float64)
            except (TypeError, ValueError):
                raise DataError(f"classic: y_list[{t}] is not numeric; loss='squared' needs "
                                "real-valued targets") from None
            if not np.isfinite(y).all():
                raise DataError(f"classic: y_list[{t}] holds NaN or infinite values")
            out.append(y)
        return out, [np.array([]) for _ in ys]
    out, classes = [], []
    for t, y in enumerate(ys):
        c = np.unique(y)
        if len(c) != 2:
            raise DataError(f"classic: y_list[{t}] has {len(c)} classes ({c[:5].tolist()}); "
                            "loss='logistic' needs exactly two per task")
        classes.append(c)
        out.append((y == c[1]).astype(np.float64))
    return out, classes


def kfold(n: int, k: int, rng: np.random.Generator, labels: np.ndarray | None = None
          ) -> np.ndarray:
    """Fold id in ``0..k-1`` of each of ``n`` samples; stratified by ``labels`` when given.

    Every class is shuffled and dealt round-robin, so a class with at least ``k`` members is in
    every fold, and one with at least two is in every training part.
    """
    folds = np.empty(n, dtype=np.int64)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c)
                                                      for c in np.unique(labels)]
    offset = 0
    for idx in groups:
        idx = rng.permutation(idx)
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return folds


class MultiTaskEstimator(BaseEstimator):
    """Base of the classic estimators: scikit-learn's parameter handling plus the task API."""

    loss: str

    def decision_function(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        raise NotImplementedError

    def predict(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        scores = self.decision_function(X_list)
        if self.loss == "squared":
            return scores
        return [c[(z > 0).astype(np.int64)] for c, z in zip(self.classes_, scores)]

    def predict_proba(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        """P(second class) per sample and task (logistic loss only)."""
        if self.loss != "logistic":
            raise DataError("classic: predict_proba needs loss='logistic'")
        return [sigmoid(z) for z in self.decision_function(X_list)]

    def score(self, X_list: Sequence[Any], y_list: Sequence[Any]) -> float:
        """Mean over tasks of R² (squared loss) or accuracy (logistic loss)."""
        Xs, ys, _ = check_tasks(X_list, y_list)
        scores = []
        for y, p in zip(ys, self.predict(Xs)):
            if self.loss == "squared":
                y = y.astype(np.float64)
                ss = float(((y - y.mean()) ** 2).sum())
                scores.append(1.0 - float(((y - p) ** 2).sum()) / ss if ss > 0 else np.nan)
            else:
                scores.append(float(np.mean(p == y)))
        return float(np.mean(scores))

    def _check_fitted(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        if not hasattr(self, "n_features_in_"):
            raise DataError(f"classic: {type(self).__name__} is not fitted; call fit first")
        Xs, _, _ = check_tasks(X_list, n_features=self.n_features_in_)
        if len(Xs) != self.n_tasks_:
            raise DataError(f"classic: got {len(Xs)} tasks, the model was fitted on "
                            f"{self.n_tasks_}")
        return Xs


class PerTask(MultiTaskEstimator):
    """Independent single-task models: ``estimator`` fitted on each task alone.

    With one task, every method of :mod:`mtlcv.classic` becomes its single-task counterpart of
    the same family, each with its own cross-validated strength: ℓ2,1 becomes the lasso (ℓ1),
    the trace norm the ℓ2 norm (whose path is the ridge path), the multi-task network one
    network per task, distribution matching a model trained on the task's own samples.
    """

    def __init__(self, estimator: MultiTaskEstimator) -> None:
        self.estimator = estimator

    @property
    def loss(self) -> str:  # type: ignore[override]
        return self.estimator.loss

    @single_threaded
    def fit(self, X_list: Sequence[Any], y_list: Sequence[Any],
            sample_weight: Sequence[Any] | None = None) -> PerTask:
        Xs, ys, ws = check_tasks(X_list, y_list, sample_weight)
        self.estimators_ = []
        for t in range(len(Xs)):
            est = clone(self.estimator)
            est.fit([Xs[t]], [ys[t]], None if ws is None else [ws[t]])
            self.estimators_.append(est)
        self.n_features_in_, self.n_tasks_ = Xs[0].shape[1], len(Xs)
        self.classes_ = [e.classes_[0] for e in self.estimators_] if self.loss == "logistic" \
            else None
        self.convergence_ = [e.convergence_ for e in self.estimators_]
        return self

    def decision_function(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        Xs = self._check_fitted(X_list)
        return [e.decision_function([X])[0] for e, X in zip(self.estimators_, Xs)]
