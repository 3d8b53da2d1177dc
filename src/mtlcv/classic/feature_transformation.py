"""Feature transformation: the multi-task feed-forward network (shared hidden layers).

Caruana, "Multitask learning", Machine Learning 28(1), 1997, Sec. 2 and Fig. 2: one network
whose hidden layers are shared by every task and whose output layer has one unit per task, so
that every task's training signal shapes the same learned transformation of the inputs (the
"inductive bias" of the related tasks). The single-task counterpart (``PerTask``) is one such
network per task with the same hidden layers ("STL" in Caruana's Fig. 1).

The objective is ``Σ_t Σ_i s_ti ℓ(f_t(x_ti), y_ti) + α/2 Σ ||weight matrices||²`` (per-task
weighted means, summed over tasks; biases are not decayed), minimised full-batch by L-BFGS-B
(scipy's, on the flattened parameters of the PyTorch module: its Fortran loop costs far less
per iteration than ``torch.optim.LBFGS`` on networks this small). Caruana trained by
backpropagation with stochastic gradient steps and early stopping on a halt set; on the small
vector problems this estimator is meant for, full-batch L-BFGS on an ℓ2-regularised objective
is deterministic, converges to a stationary point it can report, and the weight decay α is
cross-validated instead of a stopping epoch (scikit-learn's ``MLPClassifier`` recommends
L-BFGS for small data for the same reasons). The problem is not convex: convergence is
reported as the iterations, the objective and the largest gradient entry at the end (no
duality gap exists).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

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
from .solvers import Convergence, ConvergenceWarning

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class _Net(nn.Module):
    """Shared hidden layers; output column t is task t's output layer."""

    def __init__(self, d: int, hidden: Sequence[int], n_tasks: int, activation: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d, h), ACTIVATIONS[activation]()]
            d = h
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(d, n_tasks)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x)).gather(1, task[:, None])[:, 0]

    def decay(self) -> torch.Tensor:
        return sum((m.weight ** 2).sum() for m in self.modules() if isinstance(m, nn.Linear))


class MultiTaskNetwork(MultiTaskEstimator):
    """Caruana's multi-task network for vector inputs (see the module docstring).

    Args:
        loss: ``"squared"`` or ``"logistic"`` (two classes per task).
        hidden: sizes of the shared hidden layers.
        activation: ``tanh`` (default; Caruana used sigmoid units), ``relu`` or ``sigmoid``.
        alpha: weight decay; ``None`` chooses it among ``alphas`` by ``cv``-fold
            cross-validation (held-out mean loss).
        max_iter: L-BFGS iterations; ``tol``: stop when the largest gradient entry falls below
            it, or when an iteration lowers the objective by less than ``1e-4 × tol`` (relative).
        standardize: scale features (and squared-loss targets) first.
        random_state: seeds the initial weights and the folds.

    Fitted attributes: ``alpha_``, ``cv_loss_`` (folds × alphas), ``convergence_``, ``net_``.
    """

    def __init__(self, loss: str = "squared", hidden: Sequence[int] = (32,),
                 activation: str = "tanh", alpha: float | None = None,
                 alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), cv: int = 3,
                 max_iter: int = 500, tol: float = 1e-5, standardize: bool = True,
                 random_state: int = 0) -> None:
        self.loss = loss
        self.hidden = hidden
        self.activation = activation
        self.alpha = alpha
        self.alphas = alphas
        self.cv = cv
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.random_state = random_state

    def _train(self, Xs: list[np.ndarray], ys: list[np.ndarray], ws: list[np.ndarray],
               alpha: float) -> tuple[_Net, Convergence]:
        T = len(Xs)
        x = torch.from_numpy(np.vstack(Xs))
        y = torch.from_numpy(np.concatenate(ys))
        task = torch.from_numpy(np.repeat(np.arange(T), [len(X) for X in Xs]))
        s = torch.from_numpy(np.concatenate([w / w.sum() for w in ws]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            net = _Net(x.shape[1], tuple(self.hidden), T, self.activation).double()
        params = list(net.parameters())
        history: list[float] = []

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            torch.nn.utils.vector_to_parameters(torch.from_numpy(theta), params)
            net.zero_grad()
            z = net(x, task)
            if self.loss == "squared":
                per = 0.5 * (z - y) ** 2
            else:
                per = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
            value = (s * per).sum() + 0.5 * alpha * net.decay()
            value.backward()
            history.append(value.item())
            return history[-1], torch.cat([p.grad.reshape(-1) for p in params]).numpy()

        theta0 = torch.nn.utils.parameters_to_vector(params).detach().numpy().copy()
        res = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "gtol": self.tol,
                                "ftol": 1e-4 * self.tol})
        value, grad = objective(res.x)
        stat = float(np.abs(grad).max())
        rel = abs(history[-3] - value) / max(abs(value), 1e-300) if len(history) > 2 \
            else math.nan
        # L-BFGS-B stops on the largest gradient entry (gtol) or on a relative objective
        # decrease below ftol; either is convergence, max_iter is not
        converged = bool(res.success)
        if not converged:
            warnings.warn(f"MultiTaskNetwork(alpha={alpha:.3g}): L-BFGS stopped at "
                          f"max_iter={self.max_iter} (largest gradient {stat:.1e})",
                          ConvergenceWarning, stacklevel=3)
        net.zero_grad()
        return net, Convergence(int(res.nit), converged, value, rel, stat)

    def _scores(self, net: _Net, Xs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [net(torch.from_numpy(X), torch.full((len(X),), t)).numpy()
                    for t, X in enumerate(Xs)]

    @single_threaded
    def fit(self, X_list: Sequence[Any], y_list: Sequence[Any],
            sample_weight: Sequence[Any] | None = None) -> MultiTaskNetwork:
        check_loss(self.loss)
        if self.activation not in ACTIVATIONS:
            raise DataError(f"classic: activation must be one of {', '.join(ACTIVATIONS)}, "
                            f"got {self.activation!r}")
        Xs, ys_raw, ws = check_tasks(X_list, y_list, sample_weight)
        ys, self.classes_ = encode_targets(self.loss, ys_raw)
        if self.loss == "squared":
            self.classes_ = None
        ws = [np.ones(len(X)) for X in Xs] if ws is None else ws
        pooled = np.vstack(Xs)
        self.x_mean_ = pooled.mean(0) if self.standardize else np.zeros(pooled.shape[1])
        sd = pooled.std(0) if self.standardize else np.ones(pooled.shape[1])
        self.x_scale_ = np.where(sd > 0, sd, 1.0)
        sq = self.standardize and self.loss == "squared"
        self.y_mean_ = np.array([y.mean() if sq else 0.0 for y in ys])
        self.y_scale_ = np.array([y.std() if sq and y.std() > 0 else 1.0 for y in ys])
        Xz = [(X - self.x_mean_) / self.x_scale_ for X in Xs]
        yz = [(y - m) / sc for y, m, sc in zip(ys, self.y_mean_, self.y_scale_)]
        self.n_features_in_, self.n_tasks_ = pooled.shape[1], len(Xs)

        if self.alpha is not None:
            self.alpha_, self.cv_loss_ = float(self.alpha), None
        else:
            self.cv_loss_ = self._cross_validate(Xz, yz, ws)
            self.alpha_ = float(self.alphas[int(np.argmin(self.cv_loss_.mean(0)))])
        self.net_, self.convergence_ = self._train(Xz, yz, ws, self.alpha_)
        return self

    def _cross_validate(self, Xz: list[np.ndarray], yz: list[np.ndarray],
                        ws: list[np.ndarray]) -> np.ndarray:
        k = int(self.cv)
        for t, X in enumerate(Xz):
            if len(X) < k:
                raise DataError(f"classic: task {t} has {len(X)} samples; cv={k} needs at "
                                f"least {k} (lower cv or give alpha)")
        rng = np.random.default_rng(self.random_state)
        folds = [kfold(len(y), k, rng, y if self.loss == "logistic" else None) for y in yz]
        losses = np.zeros((k, len(self.alphas)))
        for f in range(k):
            tr = [fo != f for fo in folds]
            va = [fo == f for fo in folds]
            for j, a in enumerate(self.alphas):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    net, _ = self._train([X[m] for X, m in zip(Xz, tr)],
                                         [y[m] for y, m in zip(yz, tr)],
                                         [w[m] for w, m in zip(ws, tr)], float(a))
                scores = self._scores(net, [X[m] for X, m in zip(Xz, va)])
                losses[f, j] = np.mean([mean_loss(self.loss, z, y[m], w[m])
                                        for z, y, w, m in zip(scores, yz, ws, va) if m.any()])
        return losses

    def decision_function(self, X_list: Sequence[Any]) -> list[np.ndarray]:
        Xs = self._check_fitted(X_list)
        z = self._scores(self.net_, [(X - self.x_mean_) / self.x_scale_ for X in Xs])
        return [zt * sc + m for zt, sc, m in zip(z, self.y_scale_, self.y_mean_)]
