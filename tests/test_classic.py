"""The mathematics of mtlcv.classic: proximal operators, optimality (KKT) conditions, duality
gaps, instance weights, agreement with independent implementations, and the cases each method
is built for."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtlcv.classic import (
    L2Linear,
    L21MultiTask,
    PerTask,
    TraceNormMultiTask,
    prox_l21,
    prox_trace,
)
from mtlcv.classic.base import sigmoid
from mtlcv.classic.feature_transformation import MultiTaskNetwork
from mtlcv.classic.instance_based import DistributionMatchingMTL, fit_softmax
from mtlcv.classic.linear import _Problem
from mtlcv.errors import DataError

TIGHT = {"tol": 1e-13, "max_iter": 100_000, "standardize": False}


def _tasks(seed=0, T=4, d=8, n=30, logistic=False, shift=0.0):
    rng = np.random.default_rng(seed)
    W = np.zeros((d, T))
    W[:3] = rng.normal(size=(3, T))
    X = [rng.normal(size=(n + 5 * t, d)) + shift * t for t in range(T)]
    y = [x @ W[:, t] + 0.3 * rng.normal(size=len(x)) for t, x in enumerate(X)]
    if logistic:
        y = [(v > np.median(v)).astype(int) for v in y]
    return X, y


def _grad(X, y, coef, intercept, loss, weights=None):
    """∇_W and ∇_b of Σ_t mean_i s_ti ℓ, computed here independently of the library."""
    G, gb = np.zeros_like(coef), np.zeros(len(X))
    for t, (x, v) in enumerate(zip(X, y)):
        s = np.ones(len(v)) if weights is None else weights[t]
        s = s / s.sum()
        z = x @ coef[:, t] + intercept[t]
        dz = s * ((z - v) if loss == "squared" else (sigmoid(z) - v))
        G[:, t], gb[t] = x.T @ dz, dz.sum()
    return G, gb


# ---------------------------------------------------------------- proximal operators
@pytest.mark.parametrize("seed", range(4))
def test_l21_prox_zeroes_whole_rows_and_equals_direct_minimisation(seed):
    rng = np.random.default_rng(seed)
    V = rng.normal(size=(12, 4)) * rng.uniform(0.1, 2.0, size=(12, 1))
    tau = float(np.median(np.linalg.norm(V, axis=1)))
    P = prox_l21(V, tau)
    norms = np.linalg.norm(V, axis=1)
    assert np.all(P[norms <= tau] == 0.0) and (norms <= tau).sum() >= 5  # exact zeros
    assert np.all(np.linalg.norm(P[norms > tau], axis=1) > 0)
    # direct: minimise tau ||w||_2 + ||w - v||² / 2 numerically, row by row
    for v, p in zip(V, P):
        res = minimize(lambda w, v=v: tau * np.sqrt(w @ w + 1e-30) + 0.5 * (w - v) @ (w - v),
                       v, method="Powell", options={"xtol": 1e-10, "ftol": 1e-14})
        assert np.allclose(res.x, p, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_trace_prox_lowers_rank_and_equals_thresholded_svd_from_eigendecomposition(seed):
    rng = np.random.default_rng(seed)
    V = rng.normal(size=(10, 6))
    tau = float(np.median(np.linalg.svd(V, compute_uv=False)))
    P = prox_trace(V, tau)
    # the same SVT built another way: V = U Σ Qᵀ from the eigendecomposition of VᵀV
    evals, Q = np.linalg.eigh(V.T @ V)
    sig = np.sqrt(np.maximum(evals, 0))
    U = V @ Q / sig
    direct = (U * np.maximum(sig - tau, 0)) @ Q.T
    assert np.allclose(P, direct, atol=1e-10)
    assert np.linalg.matrix_rank(P) == int((sig > tau).sum()) < np.linalg.matrix_rank(V)
    # a threshold above the largest singular value leaves nothing
    assert np.all(prox_trace(V, sig.max() * 1.01) == 0.0)


# ---------------------------------------------------------------- optimality conditions
def _alpha_max(X, y, loss, dual_norm):
    """The smallest strength with W = 0 optimal: the dual norm of ∇_W at W = 0 (optimal b)."""
    b = np.array([v.mean() for v in y], dtype=float)
    if loss == "logistic":
        b = np.log(b / (1 - b))
    G, _ = _grad(X, y, np.zeros((X[0].shape[1], len(X))), b, loss)
    return dual_norm(G)


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_l21_solution_satisfies_kkt(loss):
    X, y = _tasks(1, logistic=loss == "logistic")
    alpha = 0.3 * _alpha_max(X, y, loss, lambda G: np.linalg.norm(G, axis=1).max())
    m = L21MultiTask(loss=loss, alpha=alpha, **TIGHT).fit(X, y)
    G, gb = _grad(X, y, m.coef_, m.intercept_, loss)
    assert np.abs(gb).max() < 1e-7  # unpenalised intercepts: zero gradient
    norms = np.linalg.norm(m.coef_, axis=1)
    on, off = norms > 0, norms == 0
    assert on.any() and off.any(), "the case must select some features and drop others"
    # selected rows: G_j = -α W_j / ||W_j||; dropped rows: ||G_j|| <= α
    assert np.allclose(G[on], -alpha * m.coef_[on] / norms[on, None], atol=1e-6)
    assert np.all(np.linalg.norm(G[off], axis=1) <= alpha * (1 + 1e-6))
    assert set(m.selected_features_) == set(np.flatnonzero(on))


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_trace_norm_solution_satisfies_kkt(loss):
    X, y = _tasks(2, T=5, logistic=loss == "logistic")
    alpha = 0.3 * _alpha_max(X, y, loss, lambda G: np.linalg.norm(G, 2))
    m = TraceNormMultiTask(loss=loss, alpha=alpha, **TIGHT).fit(X, y)
    G, gb = _grad(X, y, m.coef_, m.intercept_, loss)
    assert np.abs(gb).max() < 1e-7
    U, s, Vt = np.linalg.svd(m.coef_)
    r = m.rank_
    assert 0 < r < min(m.coef_.shape), "the case must be rank-deficient but not zero"
    assert r == int((s > 1e-8 * s[0]).sum())
    U, Vt = U[:, :r], Vt[:r]
    S = -G / alpha  # must be a subgradient of the trace norm at W: U Vᵀ + Z
    assert np.allclose(U.T @ S @ Vt.T, np.eye(r), atol=1e-5)
    Z = S - U @ Vt
    assert np.allclose(U.T @ Z, 0, atol=1e-5) and np.allclose(Z @ Vt.T, 0, atol=1e-5)
    assert np.linalg.norm(Z, 2) <= 1 + 1e-5


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_l2_solution_satisfies_stationarity(loss):
    X, y = _tasks(3, logistic=loss == "logistic")
    m = L2Linear(loss=loss, alpha=0.1, **TIGHT).fit(X, y)
    G, gb = _grad(X, y, m.coef_, m.intercept_, loss)
    assert np.abs(G + 0.1 * m.coef_).max() < 1e-6 and np.abs(gb).max() < 1e-7


def test_duality_gap_bounds_suboptimality_and_vanishes_at_the_solution():
    X, y = _tasks(4)
    alpha = 0.05
    for cls in (L21MultiTask, TraceNormMultiTask):
        est = cls(alpha=alpha, **TIGHT)
        est.fit(X, y)
        prob = _Problem(X, y, [np.ones(len(v)) for v in y], "squared", True)
        gap = est._gap(prob, alpha)
        opt = np.vstack([est.W_, est._intercepts_solver()[None]])
        def F(Th, prob=prob, est=est):
            return prob.smooth(Th)[0] + alpha * est.penalty.value(Th[:-1])

        assert est.convergence_.converged and gap(opt) < 1e-8
        rng = np.random.default_rng(0)
        for scale in (1e-3, 1e-1, 1.0):
            worse = opt + scale * rng.normal(size=opt.shape)
            for t in range(len(X)):  # the gap is taken at the intercepts optimal for W
                worse[-1, t] = np.mean(y[t] - X[t] @ worse[:-1, t])
            assert gap(worse) >= F(worse) - F(opt) - 1e-12 > 0


def test_network_stops_at_a_stationary_point():
    X, y = _tasks(5, T=3, d=5, n=20)
    m = MultiTaskNetwork(hidden=(6,), alpha=1e-2, max_iter=2000, tol=1e-9).fit(X, y)
    assert m.convergence_.converged and m.convergence_.stationarity <= 1e-6
    net = m.net_
    net.zero_grad()
    Xz = [torch.from_numpy((x - m.x_mean_) / m.x_scale_) for x in X]
    yz = [torch.from_numpy((v - mu) / sc) for v, mu, sc in zip(y, m.y_mean_, m.y_scale_)]
    obj = sum(0.5 * ((net(x, torch.full((len(x),), t)) - v) ** 2).mean()
              for t, (x, v) in enumerate(zip(Xz, yz))) + 0.5 * 1e-2 * net.decay()
    obj.backward()
    largest = max(float(p.grad.abs().max()) for p in net.parameters())
    assert largest < 1e-6 and np.isclose(largest, m.convergence_.stationarity, rtol=1e-3)


# ---------------------------------------------------------------- independent implementations
def test_single_task_l21_is_sklearn_lasso_and_l2_is_ridge_and_logistic():
    from sklearn.linear_model import Lasso, LogisticRegression, Ridge

    X, y = _tasks(6, T=1, n=40)
    ours = L21MultiTask(alpha=0.05, **TIGHT).fit(X, y)
    ref = Lasso(alpha=0.05, tol=1e-12, max_iter=100_000).fit(X[0], y[0])
    assert np.allclose(ours.coef_[:, 0], ref.coef_, atol=1e-6)
    assert np.isclose(ours.intercept_[0], ref.intercept_, atol=1e-6)
    n = len(y[0])
    ridge = L2Linear(alpha=0.3, **TIGHT).fit(X, y)  # ½ mean r² + α/2 ||w||² = Ridge(n α)
    ref = Ridge(alpha=0.3 * n).fit(X[0], y[0])
    assert np.allclose(ridge.coef_[:, 0], ref.coef_, atol=1e-6)
    yb = [(y[0] > 0).astype(int)]
    logit = L2Linear(loss="logistic", alpha=0.05, **TIGHT).fit(X, yb)
    ref = LogisticRegression(C=1 / (0.05 * n), tol=1e-12, max_iter=10_000).fit(X[0], yb[0])
    assert np.allclose(logit.coef_[:, 0], ref.coef_[0], atol=1e-5)


@pytest.mark.parametrize("cls", [L21MultiTask, TraceNormMultiTask, L2Linear])
def test_integer_sample_weights_equal_repeated_samples(cls):
    X, y = _tasks(7, T=3, logistic=True)
    rng = np.random.default_rng(0)
    w = [rng.integers(0, 3, size=len(v)).astype(float) for v in y]
    Xr = [np.repeat(x, wt.astype(int), axis=0) for x, wt in zip(X, w)]
    yr = [np.repeat(v, wt.astype(int)) for v, wt in zip(y, w)]
    a = cls(loss="logistic", alpha=0.02, **TIGHT).fit(X, y, sample_weight=w)
    b = cls(loss="logistic", alpha=0.02, **TIGHT).fit(Xr, yr)
    assert np.allclose(a.coef_, b.coef_, atol=1e-6)
    G, _ = _grad(X, y, a.coef_, a.intercept_, "logistic", w)  # weighted KKT: intercepts
    assert np.isfinite(G).all()


def test_path_starts_at_alpha_max_with_nothing_selected():
    X, y = _tasks(8)
    m = L21MultiTask(n_alphas=6).fit(X, y)
    assert m.path_[0]["alpha"] == m.alphas_[0] and m.path_[0]["selected"] == 0
    assert m.path_[-1]["alpha"] == m.alpha_ and m.cv_loss_.shape == (3, 6)
    assert all(e["converged"] for e in m.path_)
    # just below α_max, something enters
    below = L21MultiTask(alpha=0.9 * m.alphas_[0], **TIGHT).fit(X, y)
    assert len(below.selected_features_) >= 1
    t = TraceNormMultiTask(n_alphas=6).fit(X, y)
    assert t.path_[0]["rank"] == 0 and "cv_loss" in t.path_[-1]


# ---------------------------------------------------------------- instance weights
def test_instance_weights_are_nonnegative_match_the_prior_and_favour_relevant_samples():
    rng = np.random.default_rng(0)
    w = rng.normal(size=4)
    # tasks 0 and 1: same inputs and concept; task 2: other inputs, opposite concept
    X = [rng.normal(size=(20, 4)), rng.normal(size=(80, 4)), rng.normal(loc=3, size=(80, 4))]
    y = [X[0] @ w, X[1] @ w, -(X[2] @ w)]
    m = DistributionMatchingMTL(alpha=0.01).fit(X, y)
    task = m.pool_task_
    for r in m.instance_weights_:
        assert np.all(r >= 0)
        # unpenalised discriminator intercepts: mean_i p(t|φ_i) = π_t, so the weights average 1
        assert np.isclose(r.mean(), 1.0, atol=1e-3)
    r0 = m.instance_weights_[0]
    assert r0[task == 1].mean() > 10 * r0[task == 2].mean()
    # a single task weighs every sample 1 and is its own single-task model
    one = DistributionMatchingMTL(alpha=0.01).fit(X[:1], y[:1])
    assert np.all(one.instance_weights_[0] == 1.0)
    ref = L2Linear(alpha=0.01).fit(X[:1], y[:1])
    assert np.allclose(one.coef_, ref.coef_, atol=1e-4)


def test_softmax_discriminator_satisfies_kkt():
    rng = np.random.default_rng(1)
    Phi = rng.normal(size=(90, 3))
    labels = (Phi[:, 0] > 0).astype(int) + (Phi[:, 1] > 0.5)
    Theta, conv = fit_softmax(Phi, labels, 3, alpha=0.1, tol=1e-10, max_iter=100_000)
    P = np.hstack([Phi, np.ones((90, 1))])
    Z = P @ Theta
    prob = np.exp(Z - Z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    grad = P.T @ (prob - np.eye(3)[labels]) / 90
    grad[:3] += 0.1 * Theta[:3]
    assert conv.converged and np.abs(grad).max() < 1e-8


# ---------------------------------------------------------------- the cases each method is for
def _delta(mtl, stl, X, y):
    """Mean relative test-RMSE change of MTL against STL (negative: MTL is better)."""
    a = [np.sqrt(np.mean((p - v) ** 2)) for p, v in zip(mtl.predict(X), y)]
    b = [np.sqrt(np.mean((p - v) ** 2)) for p, v in zip(stl.predict(X), y)]
    return float(np.mean([(p - q) / q for p, q in zip(a, b)]))


def test_l21_and_trace_norm_beat_single_task_models_on_the_structure_they_assume():
    from mtlcv.classic.datasets import load

    for name, cls in (("sparse", L21MultiTask), ("lowrank", TraceNormMultiTask)):
        deltas = []
        for seed in (0, 1):
            data = load(name, seed, train_size={"sparse": 20, "lowrank": 15}[name])
            opts = {"n_alphas": 10, "random_state": seed}
            mtl = cls(**opts).fit(data.X_train, data.y_train)
            stl = PerTask(cls(**opts)).fit(data.X_train, data.y_train)
            deltas.append(_delta(mtl, stl, data.X_test, data.y_test))
        assert max(deltas) < -0.05, f"{name}: {deltas}"


def test_network_and_distribution_matching_beat_single_task_models_on_shared_structure():
    rng = np.random.default_rng(0)
    d, T = 6, 3
    U, C = rng.normal(size=(d, 2)), rng.normal(size=(2, T))
    f = lambda x, t: np.tanh(x @ U) @ C[:, t]  # noqa: E731  (shared nonlinear features)
    X = [rng.normal(size=(25, d)) for _ in range(T)]
    y = [f(x, t) + 0.1 * rng.normal(size=len(x)) for t, x in enumerate(X)]
    Xte = [rng.normal(size=(300, d)) for _ in range(T)]
    yte = [f(x, t) for t, x in enumerate(Xte)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {"hidden": (8,), "alpha": 1e-2}
        mtl = MultiTaskNetwork(**opts).fit(X, y)
        stl = PerTask(MultiTaskNetwork(**opts)).fit(X, y)
    assert _delta(mtl, stl, Xte, yte) < -0.1
    # one concept, tasks drawn from shifted input distributions, the first with few samples
    w = rng.normal(size=d)
    X = [rng.normal(size=(12, d))] + [rng.normal(loc=0.3 * t, size=(100, d)) for t in (1, 2)]
    y = [x @ w + 0.5 * rng.normal(size=len(x)) for x in X]
    Xte = [rng.normal(loc=0.3 * t, size=(300, d)) for t in range(3)]
    yte = [x @ w for x in Xte]
    mtl = DistributionMatchingMTL(n_alphas=8).fit(X, y)
    stl = PerTask(DistributionMatchingMTL(n_alphas=8)).fit(X, y)
    rm = lambda m: np.sqrt(np.mean((m.predict(Xte)[0] - yte[0]) ** 2))  # noqa: E731
    assert rm(mtl) < 0.8 * rm(stl)


# ---------------------------------------------------------------- API and errors
def test_bad_input_is_one_line_data_error():
    X, y = _tasks(9)
    with pytest.raises(DataError, match=r"X_list\[1\] has 5 features, expected 8"):
        L21MultiTask(alpha=1).fit([X[0], X[1][:, :5]], y[:2])
    with pytest.raises(DataError, match=r"y_list\[0\] has 3 classes"):
        L21MultiTask(loss="logistic", alpha=1).fit(X[:1], [np.arange(len(y[0])) % 3])
    with pytest.raises(DataError, match="not fitted"):
        L21MultiTask().predict(X)
    with pytest.raises(DataError, match="loss must be one of"):
        L21MultiTask(loss="hinge").fit(X, y)
    m = L21MultiTask(alpha=0.1).fit(X, y)
    with pytest.raises(DataError, match="got 2 tasks, the model was fitted on 4"):
        m.predict(X[:2])


def test_estimators_follow_scikit_learn_conventions():
    from sklearn.base import clone

    X, y = _tasks(10, logistic=True)
    m = clone(L21MultiTask(loss="logistic", alpha=0.05)).fit(X, y)
    assert m.get_params()["alpha"] == 0.05
    proba = m.predict_proba(X)
    assert all(((p >= 0) & (p <= 1)).all() for p in proba)
    assert 0.5 < m.score(X, y) <= 1.0
    assert [set(np.unique(p)) <= {0, 1} for p in m.predict(X)] == [True] * 4


# ---------------------------------------------------------------- the command
def test_classic_command_prints_per_task_metrics_and_delta_m(capsys):
    from mtlcv.cli import main

    assert main(["classic", "--method", "l21", "--dataset", "linnerud", "--seeds", "0,1",
                 "--json"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["tasks"] == ["weight", "waist", "pulse"] and len(res["runs"]) == 2
    assert set(res["summary"]["mtl"]["pulse"]) == {"rmse", "mae"}
    assert np.isfinite(res["summary"]["delta_m"]["stl"]["mean"])
    assert out.err.count("[seed") == 6  # a progress line per fit: 2 seeds x (MTL, STL, l2)


def test_classic_command_rejects_unknown_names(capsys):
    from mtlcv.cli import main

    assert main(["classic", "--method", "lasso", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'lasso'" in err and "Traceback" not in err
    assert main(["classic", "--method", "l21", "--dataset", "digits", "--train-size", "3"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["network", "trace", "instance"])
def test_every_method_runs_from_the_command_line_api(method, monkeypatch):
    from mtlcv.classic import compare
    from mtlcv.classic.compare import markdown, run

    if method == "network":  # a smaller network and grid: the same code path, in seconds
        small = compare.Method("feature transformation", "Caruana 1997", lambda loss, seed:
                               MultiTaskNetwork(loss=loss, hidden=(4,), alphas=(1e-2, 1e-1),
                                                max_iter=100, random_state=seed))
        monkeypatch.setitem(compare.METHODS, "network", small)
    res = run(method, "linnerud", [0], log=lambda line: None)
    assert np.isfinite(res["summary"]["delta_m"]["stl"]["mean"])
    assert "| weight | rmse ↓ |" in markdown(res)
