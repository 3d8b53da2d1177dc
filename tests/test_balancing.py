"""Task balancing on bare matrices and loss histories: each method against its paper's property
or an independent NumPy computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mtlcv import balancing
from mtlcv.balancing.solvers import min_norm_simplex, nash_bargaining, nonneg_qp
from mtlcv.errors import ConfigError
from mtlcv.registry import BALANCERS

GRADIENT_METHODS = [
    "aligned-mtl", "cagrad", "dbmtl", "graddrop", "gradvac", "imtl", "imtl-g", "mgda",
    "mgda-ub", "nashmtl", "pcgrad", "upgrad",
]
ALL_METHODS = sorted(GRADIENT_METHODS + [
    "dtp", "dwa", "famo", "fixed", "gradnorm", "imtl-l", "rlw", "si", "uncertainty",
])


def rand_matrices(T: int, n: int, P: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        G = torch.randn(T, P, generator=g, dtype=torch.float64)
        if k % 3 == 0:  # make conflicts likely: a task roughly opposite to another
            G[1] = -G[0] + 0.3 * torch.randn(P, generator=g, dtype=torch.float64)
        out.append(G)
    return out


def simplex_grid(T: int, n: int) -> np.ndarray:
    pts = [c for c in itertools.product(range(n + 1), repeat=T - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], dtype=float) / n


def test_every_method_is_registered():
    assert set(ALL_METHODS) <= set(BALANCERS.names())
    for name in GRADIENT_METHODS:
        b = balancing.create(name, num_tasks=3)
        assert b.family == "aggregation" and hasattr(b, "aggregate")


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="no option 'nope'"):
        balancing.create("pcgrad", num_tasks=2, nope=1)
    with pytest.raises(ConfigError, match="mode"):
        balancing.create("mgda", num_tasks=2, mode="params")
    with pytest.raises(ConfigError, match="normalization"):
        balancing.create("mgda", num_tasks=2, normalization="l1")
    with pytest.raises(ConfigError, match="temperature"):
        balancing.create("dwa", num_tasks=2, temperature=0)
    with pytest.raises(ConfigError, match="leak"):
        balancing.create("graddrop", num_tasks=2, leak=1.5)
    with pytest.raises(ConfigError, match="forms"):
        balancing.create("uncertainty", num_tasks=2, forms=["regression"])
    with pytest.raises(ConfigError, match="distribution"):
        balancing.create("rlw", num_tasks=2, distribution="cauchy")


# ---------------------------------------------------------------- PCGrad
def test_pcgrad_two_tasks_never_conflicts_with_either_gradient():
    b = balancing.create("pcgrad", num_tasks=2)
    conflicts = 0
    for G in rand_matrices(2, 200, seed=1):
        d = b.aggregate(G)
        conflicts += bool(G[0] @ G[1] < 0)
        assert (G @ d >= -1e-10).all()
    assert conflicts > 50  # the property was exercised on conflicting pairs


def test_pcgrad_matches_direct_projection_loop():
    b = balancing.create("pcgrad", num_tasks=4)
    for G in rand_matrices(4, 20, seed=2):
        torch.manual_seed(5)
        d = b.aggregate(G)
        torch.manual_seed(5)
        g = G.numpy()
        out = np.zeros(g.shape[1])
        for i in range(4):  # Algorithm 1 with the same random orders
            gi = g[i].copy()
            for j in torch.randperm(4).tolist():
                if j != i and gi @ g[j] < 0:
                    gi -= gi @ g[j] / (g[j] @ g[j]) * g[j]
            out += gi
        np.testing.assert_allclose(d.numpy(), out, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- MGDA
@pytest.mark.parametrize("T,n", [(2, 20000), (3, 300)])
def test_mgda_is_min_norm_point_of_convex_hull(T, n):
    grid = simplex_grid(T, n)
    b = balancing.create("mgda", num_tasks=T)
    for G in rand_matrices(T, 15, P=5, seed=T) + [torch.randn(T, 2, dtype=torch.float64)]:
        d = b.aggregate(G)
        w = b.last_weights.numpy()
        assert w.min() >= -1e-12 and w.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(d.numpy(), w @ G.numpy(), rtol=1e-12, atol=1e-12)
        M = (G @ G.T).numpy()
        brute = np.einsum("ni,ij,nj->n", grid, M, grid).min()
        norm2 = float(d @ d)
        assert norm2 <= brute + 1e-12 * max(1.0, brute)  # no grid point beats the solver
        assert norm2 >= brute - 1e-3 * np.trace(M) / n  # and it is the grid's optimum


def test_min_norm_solver_kkt_and_degenerate_cases():
    rng = np.random.default_rng(0)
    for T in (4, 6, 10):
        for _ in range(10):
            G = rng.normal(size=(T, 5))
            M = G @ G.T
            w = min_norm_simplex(M)
            Mw = M @ w
            # KKT: every gradient lies on the far side of the min-norm point's supporting plane
            assert (Mw >= w @ Mw - 1e-9 * np.trace(M)).all()
            assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    # duplicated gradients, a zero gradient, all-zero
    g = rng.normal(size=(1, 4))
    assert min_norm_simplex(np.repeat(g @ g.T, 3).reshape(1, 3).repeat(3, 0)).sum() == 1
    G = np.vstack([rng.normal(size=4), np.zeros(4)])
    np.testing.assert_allclose(min_norm_simplex(G @ G.T), [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(min_norm_simplex(np.zeros((3, 3))), [1 / 3] * 3)


def test_mgda_normalizations_follow_the_official_code():
    G = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    for norm, scale in [("none", [1, 1]), ("l2", [3, 1]), ("loss", [2, 0.5]),
                        ("loss+", [6, 0.5])]:
        b = balancing.create("mgda", num_tasks=2, normalization=norm)
        d = b.aggregate(G, losses)
        Gn = G / torch.tensor(scale, dtype=torch.float64)[:, None]
        # orthogonal rows: min-norm weights are proportional to 1/||g_t||^2
        inv = 1 / (Gn * Gn).sum(1)
        np.testing.assert_allclose(b.last_weights.numpy(), (inv / inv.sum()).numpy(), rtol=1e-9)
        # weights multiply the raw gradients
        np.testing.assert_allclose(d.numpy(), (b.last_weights @ G).numpy(), rtol=1e-12)


# ---------------------------------------------------------------- CAGrad
def test_cagrad_with_c_zero_is_the_mean_gradient():
    for rescale in (0, 1, 2):
        b = balancing.create("cagrad", num_tasks=3, c=0.0, rescale=rescale)
        for G in rand_matrices(3, 10, seed=3):
            np.testing.assert_allclose(b.aggregate(G).numpy(), G.mean(0).numpy(), atol=1e-7)


@pytest.mark.parametrize("T,n", [(2, 20000), (3, 300)])
def test_cagrad_solves_its_dual_and_builds_the_official_update(T, n):
    grid = simplex_grid(T, n)
    c = 0.4
    b = balancing.create("cagrad", num_tasks=T, c=c)
    for G in rand_matrices(T, 8, P=6, seed=10 + T):
        d = b.aggregate(G).numpy()
        A = (G @ G.T).numpy()
        bb = np.full(T, 1 / T)
        phi = c * np.sqrt(A.mean() + 1e-8) + 1e-8

        def obj(W: np.ndarray, A=A, bb=bb, phi=phi) -> np.ndarray:
            return W @ A @ bb + phi * np.sqrt(np.einsum("ni,ij,nj->n", W, A, W) + 1e-8)

        w = b.last_inner.numpy()
        assert obj(w[None])[0] <= obj(grid).min() + 1e-9
        gw = w @ G.numpy()
        g0 = G.numpy().mean(0)
        expect = (g0 + phi / (np.linalg.norm(gw) + 1e-8) * gw) / (1 + c**2)
        np.testing.assert_allclose(d, expect, rtol=1e-7, atol=1e-9)


def test_cagrad_sum_scale_is_the_official_codes_times_T():
    """Cranial-XIX/CAGrad nyuv2/utils.py overwrite_grad: ``newgrad * 3  # to match the sum
    loss``: the published runs' shared update is T times Algorithm 1's d/(1+c^2)."""
    G = rand_matrices(3, 1, seed=5)[0]
    d = balancing.create("cagrad", num_tasks=3).aggregate(G)
    d3 = balancing.create("cagrad", num_tasks=3, sum_scale=True).aggregate(G)
    np.testing.assert_allclose(d3.numpy(), 3 * d.numpy(), rtol=1e-12)
    with pytest.raises(ConfigError, match="sum_scale"):
        balancing.create("cagrad", num_tasks=3, sum_scale="yes")


# ---------------------------------------------------------------- Nash-MTL
@pytest.mark.parametrize("T", [2, 3, 5])
def test_nashmtl_alpha_solves_the_bargaining_condition(T):
    b = balancing.create("nashmtl", num_tasks=T)
    for G in rand_matrices(T, 10, P=T + 4, seed=20 + T):
        d = b.aggregate(G)
        a = b.last_weights.numpy()
        M = (G @ G.T).numpy()
        assert (a > 0).all()
        np.testing.assert_allclose(M @ a, 1 / a, rtol=1e-6)
        np.testing.assert_allclose(d.numpy(), a @ G.numpy(), rtol=1e-12)
    # the exact solution's update has squared norm T and utilities 1/alpha > 0 for every task
    G = rand_matrices(T, 1, P=T + 4, seed=1)[0] * 100
    d = b.aggregate(G)
    assert float(d @ d) == pytest.approx(T, rel=1e-6)
    assert (G @ d > 0).all()


def test_nashmtl_default_is_the_official_exact_solution_on_conflicting_gradients():
    """The official code's alpha solves alpha_i (G G^T alpha)_i = 1 on the UNnormalised Gramian
    (its constraint -log(alpha_i n) - log((G G^T / n alpha)_i) <= 0), so before clipping the
    shared update has squared norm alpha^T G G^T alpha = T, whatever the gradients' scale. The
    old default (alpha of the Frobenius-normalised Gramian used as is) gave sqrt(n) times that
    and, on such conflicting pairs, sometimes a different direction (no convergence)."""
    g = torch.Generator().manual_seed(8)
    b = balancing.create("nashmtl", num_tasks=2)  # defaults, warm-started from call to call
    for k in range(40):
        G = torch.randn(2, 50, generator=g, dtype=torch.float64)
        G[1] = -0.6 * G[0] + 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
        G = G * 10.0 ** (k % 5 - 2)  # gradients of very different scales
        d = b.aggregate(G)
        a = b.last_weights.numpy()
        M = (G @ G.T).numpy()
        np.testing.assert_allclose(a * (M @ a), 1.0, rtol=1e-6)
        assert float(d @ d) == pytest.approx(2.0, rel=1e-6)
        assert (G @ d > 0).all()  # every task improves
    with pytest.raises(ConfigError, match="normalize"):  # the non-official variant is gone
        balancing.create("nashmtl", num_tasks=2, normalize=True)


def test_nash_solver_warm_start_and_update_every():
    M = np.array([[2.0, -0.5], [-0.5, 1.0]])
    a, ok = nash_bargaining(M, np.array([10.0, 0.01]), max_iter=50)
    assert ok
    np.testing.assert_allclose(M @ a, 1 / a, rtol=1e-9)
    # opposite gradients: no solution, reported as such
    assert not nash_bargaining(np.array([[1.0, -1.0], [-1.0, 1.0]]))[1]
    b = balancing.create("nashmtl", num_tasks=2, update_weights_every=3)
    G = torch.randn(2, 5, dtype=torch.float64)
    b.aggregate(G)
    first = b.last_weights.clone()
    b.aggregate(torch.randn(2, 5, dtype=torch.float64))  # reuses alpha
    assert torch.equal(b.last_weights, first)
    b.aggregate(torch.randn(2, 5, dtype=torch.float64))
    b.aggregate(torch.randn(2, 5, dtype=torch.float64))  # step 3: recomputed
    assert not torch.equal(b.last_weights, first)


# ---------------------------------------------------------------- IMTL-G
@pytest.mark.parametrize("T", [2, 3, 5])
def test_imtl_g_equal_projections_on_unit_gradients(T):
    b = balancing.create("imtl-g", num_tasks=T)
    for G in rand_matrices(T, 10, P=8, seed=30 + T):
        G = G * torch.logspace(-2, 2, T, dtype=torch.float64)[:, None]  # very different scales
        d = b.aggregate(G)
        U = G / G.norm(dim=1, keepdim=True)
        proj = (U @ d).numpy()
        np.testing.assert_allclose(proj, proj[0], rtol=1e-8)
        assert float(b.last_weights.sum()) == pytest.approx(1.0)


# ---------------------------------------------------------------- UPGrad
@pytest.mark.parametrize("T", [2, 3, 6])
def test_upgrad_never_conflicts_with_any_gradient(T):
    b = balancing.create("upgrad", num_tasks=T)
    for G in rand_matrices(T, 30, P=10, seed=40 + T):
        d = b.aggregate(G)
        # the regularisation eps * I allows violations of order eps relative to the norms
        assert (G @ d >= -1e-4 * (G.norm(dim=1) * d.norm()).max()).all()


def test_upgrad_is_the_mean_without_conflicts_and_projects_exactly():
    G = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.4, 2.0]], dtype=torch.float64)
    b = balancing.create("upgrad", num_tasks=3, reg_eps=0.0)
    np.testing.assert_allclose(b.aggregate(G).numpy(), G.mean(0).numpy(), rtol=1e-10)
    # two opposite-ish gradients: each projection lands on the other's normal plane
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    d = balancing.create("upgrad", num_tasks=2, reg_eps=0.0).aggregate(G).numpy()
    p1 = np.array([1.0, 0.0]) - (np.array([1.0, 0.0]) @ [-1, 1]) / 2 * np.array([-1.0, 1.0])
    p2 = np.array([-1.0, 1.0]) - (np.array([-1.0, 1.0]) @ [1, 0]) * np.array([1.0, 0.0])
    np.testing.assert_allclose(d, (p1 + p2) / 2, atol=1e-10)


def test_upgrad_below_norm_eps_returns_the_mean_gradient_as_torchjd():
    # conflicting but tiny gradients (trace of G G^T below norm_eps = 1e-4): torchjd replaces the
    # Gramian by zeros, the projections keep the preference 1/T, and the update is the mean
    G = 1e-3 * torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    b = balancing.create("upgrad", num_tasks=2)
    np.testing.assert_allclose(b.aggregate(G).numpy(), G.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(b.last_weights.numpy(), [0.5, 0.5], rtol=1e-12)


def test_nonneg_qp_kkt():
    rng = np.random.default_rng(1)
    for n in (1, 3, 8):
        for _ in range(20):
            X = rng.normal(size=(n, n + 2))
            A = X @ X.T + 1e-3 * np.eye(n)
            bvec = rng.normal(size=n)
            x = nonneg_qp(A, bvec)
            g = A @ x + bvec
            assert x.min() >= 0
            assert (g >= -1e-9).all() and abs(x @ g) < 1e-9


# ---------------------------------------------------------------- Aligned-MTL
def test_aligned_mtl_aligns_the_gradient_system():
    b = balancing.create("aligned-mtl", num_tasks=3)
    for G in rand_matrices(3, 10, P=6, seed=50):
        G = G * torch.tensor([[10.0], [1.0], [0.1]], dtype=torch.float64)
        d = b.aggregate(G)
        M = G @ G.T
        B = b.alignment(M)
        Ga = B @ G
        lam_min = torch.linalg.eigvalsh(M).min()
        # orthogonal aligned gradients of equal norm sigma = sqrt(lambda_min): condition number 1
        np.testing.assert_allclose(
            (Ga @ Ga.T).numpy(), float(lam_min) * np.eye(3), atol=1e-8 * float(M.max())
        )
        np.testing.assert_allclose(d.numpy(), Ga.sum(0).numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose((Ga @ d).numpy(), float(lam_min), rtol=1e-7)
    # a rank-deficient system stays finite and aligned on its span
    G = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.isfinite(b.aggregate(G)).all()


# ---------------------------------------------------------------- GradDrop
def test_graddrop_kept_gradients_agree_in_sign_per_element():
    torch.manual_seed(0)
    b = balancing.create("graddrop", num_tasks=3)
    G = torch.randn(3, 2000, dtype=torch.float64)
    d = b.aggregate(G)
    M = b.last_mask
    kept = torch.where(M, G, torch.zeros_like(G))
    assert ((kept >= 0).all(0) | (kept <= 0).all(0)).all()
    np.testing.assert_allclose(d.numpy(), kept.sum(0).numpy())
    # the positive sign is kept with probability P = (1 + sum g / sum |g|) / 2
    purity = 0.5 * (1 + G.sum(0) / G.abs().sum(0))
    pos = (M & (G > 0)).any(0).double()
    assert abs(float((pos - purity).mean())) < 0.03
    # leak 1 keeps everything
    full = balancing.create("graddrop", num_tasks=3, leak=1.0)
    np.testing.assert_allclose(full.aggregate(G).numpy(), G.sum(0).numpy())


def test_graddrop_with_batch_and_activation_signs():
    torch.manual_seed(1)
    b = balancing.create("graddrop", num_tasks=2)
    B, Q = 4, 50
    G = torch.randn(2, B * Q, dtype=torch.float64)
    signs = torch.sign(torch.randn(B * Q, dtype=torch.float64))
    d = b.aggregate(G, signs=signs, batch=B)
    S = (G * signs).reshape(2, B, Q).sum(1)
    M = b.last_mask  # one mask per element of the representation, shared by the batch
    kept_S = torch.where(M, S, torch.zeros_like(S))
    assert ((kept_S >= 0).all(0) | (kept_S <= 0).all(0)).all()
    expect = (G.reshape(2, B, Q) * M[:, None, :]).sum(0).reshape(-1)
    np.testing.assert_allclose(d.numpy(), expect.numpy())


# ---------------------------------------------------------------- GradVac
def test_gradvac_reaches_target_similarity_and_updates_ema():
    b = balancing.create("gradvac", num_tasks=2, beta=0.5)
    b.target.fill_(0.5)
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # cos = 0 < 0.5
    d = b.aggregate(G)
    w = b.last_weights
    # g_0' = g_0 + w_01 g_1 has cosine 0.5 with g_1 (and symmetrically)
    g0 = G[0] + (w[1] - 1) * G[1]
    assert float(g0 @ G[1] / g0.norm()) == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_allclose(d.numpy(), (w @ G).numpy())
    # EMA: (1 - beta) * 0.5 + beta * 0
    np.testing.assert_allclose(b.target.numpy(), [[0.5, 0.25], [0.25, 0.5]])
    # above target: no change, EMA still moves
    b2 = balancing.create("gradvac", num_tasks=2, beta=0.01)
    G = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(b2.aggregate(G).numpy(), G.sum(0).numpy())
    cos = 0.4 / 1.04
    assert float(b2.target[0, 1]) == pytest.approx(0.01 * cos)


# ---------------------------------------------------------------- DB-MTL
@pytest.mark.parametrize("sigma", [None, 0.5])
def test_dbmtl_matches_its_recurrence(sigma):
    # default: the authors' LibMTL (DB_beta 0.9, DB_beta_sigma 0, i.e. a constant beta)
    opts = {} if sigma is None else {"beta_sigma": sigma}
    b = balancing.create("dbmtl", num_tasks=3, **opts)
    Gs = rand_matrices(3, 4, seed=60)
    ema = np.zeros((3, 7))
    for k, G in enumerate(Gs, start=1):
        d = b.aggregate(G).numpy()
        g = G.numpy()
        ema = g + 0.9 / k ** (sigma or 0.0) * (ema - g)
        n = np.linalg.norm(ema, axis=1)
        alpha = n.max() / (n + 1e-8)
        np.testing.assert_allclose(d, alpha @ ema, rtol=1e-10)
        # every task contributes with the same (largest) norm
        np.testing.assert_allclose(np.linalg.norm(alpha[:, None] * ema, axis=1), n.max())


# ---------------------------------------------------------------- loss weighting
def test_dwa_matches_its_formula_and_is_uniform_for_two_epochs():
    b = balancing.create("dwa", num_tasks=3)
    losses = torch.ones(3)
    hist = [[1.0, 2.0, 4.0], [0.5, 1.5, 4.0], [0.4, 1.5, 2.0]]
    assert b.weights(losses).tolist() == [1.0, 1.0, 1.0]  # epoch 1
    b.on_epoch_end(0, hist[0])
    assert b.weights(losses).tolist() == [1.0, 1.0, 1.0]  # epoch 2
    b.on_epoch_end(1, hist[1])
    r = np.array([0.5 / 1.0, 1.5 / 2.0, 4.0 / 4.0])
    expect = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(b.weights(losses).numpy(), expect, rtol=1e-6)
    assert float(b.weights(losses).sum()) == pytest.approx(3.0)
    b.on_epoch_end(2, hist[2])
    r = np.array([0.4 / 0.5, 1.5 / 1.5, 2.0 / 4.0])
    np.testing.assert_allclose(
        b.weights(losses).numpy(), 3 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-6
    )


def test_dtp_prioritises_the_task_with_the_lower_kpi():
    b = balancing.create("dtp", num_tasks=2, gamma=2.0, alpha=0.5)
    assert b.weights(torch.ones(2)).tolist() == [1.0, 1.0]
    b.on_epoch_end(0, [1.0, 1.0], [0.9, 0.3])
    w = b.weights(torch.ones(2)).numpy()
    assert w[1] > w[0]
    k = np.array([0.9, 0.3])
    np.testing.assert_allclose(w, -((1 - k) ** 2) * np.log(k), rtol=1e-6)
    b.on_epoch_end(1, [1.0, 1.0], [0.5, 0.7])  # moving average: 0.5 * new + 0.5 * old
    k = 0.5 * np.array([0.5, 0.7]) + 0.5 * k
    np.testing.assert_allclose(b.weights(torch.ones(2)).numpy(), -((1 - k) ** 2) * np.log(k),
                               rtol=1e-6)


@pytest.mark.parametrize("form,optimum", [("regression", np.log), ("classification",
                                                                      lambda x: np.log(2 * x))])
def test_uncertainty_optimum_is_the_log_loss(form, optimum):
    b = balancing.create("uncertainty", num_tasks=3, forms=form)
    L = torch.tensor([0.5, 2.0, 4.0])
    opt = torch.optim.Adam(b.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        b.backward(L.clone().requires_grad_())
        opt.step()
    np.testing.assert_allclose(b.log_var.detach().numpy(), optimum(L.numpy()), atol=1e-3)


def test_uncertainty_starts_like_mtan_and_is_never_weight_decayed():
    from mtlcv.config import from_dict
    from mtlcv.engine.experiment import build_optimizer, optimizer_groups

    b = balancing.create("uncertainty", num_tasks=3)
    # mtan's logsigma = [-0.5, -0.5, -0.5] (and LibMTL's UW): weights 0.5 exp(0.5)
    np.testing.assert_allclose(b.log_var.detach().numpy(), [-0.5] * 3)
    np.testing.assert_allclose(b.weights(torch.ones(3)).detach().numpy(), 0.5 * np.exp(0.5),
                               rtol=1e-6)
    model = torch.nn.Linear(2, 2)
    cfg = from_dict({"optim": {"name": "adam", "lr": 1e-4, "weight_decay": 1e-5}})
    opt = build_optimizer(cfg, optimizer_groups(model, b))
    (mg, bg) = opt.param_groups
    assert (mg["lr"], mg["weight_decay"]) == (1e-4, 1e-5)
    assert (bg["lr"], bg["weight_decay"]) == (1e-4, 0.0) and bg["params"] == [b.log_var]
    # Nash-MTL's / FAMO's code: s_t from 0, trained at --method-params-lr 0.025
    b = balancing.create("uncertainty", num_tasks=3, init=0.0, lr=0.025)
    assert not b.log_var.detach().any()
    bg = build_optimizer(cfg, optimizer_groups(model, b)).param_groups[1]
    assert (bg["lr"], bg["weight_decay"]) == (0.025, 0.0)


def test_si_is_invariant_to_the_scale_of_each_loss():
    """Nash-MTL's SI baseline minimises sum_t log L_t: multiplying one task's loss by a constant
    leaves every gradient unchanged."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(3, 5)

    def grads(scales):
        w.grad = None
        losses = torch.stack([(x[t] @ w).square() + 0.1 for t in range(3)]) * scales
        balancing.create("si", num_tasks=3).backward(losses)
        return w.grad.clone()

    g = grads(torch.ones(3))
    torch.testing.assert_close(grads(torch.tensor([100.0, 0.01, 3.0])), g)
    L = torch.stack([(x[t] @ w).square() + 0.1 for t in range(3)])
    want = torch.autograd.grad(torch.log(L).sum(), w)[0]
    torch.testing.assert_close(g, want)


def test_imtl_l_scaled_losses_go_to_one():
    b = balancing.create("imtl-l", num_tasks=2)
    L = torch.tensor([0.2, 5.0])
    opt = torch.optim.Adam(b.parameters(), lr=0.05)
    for _ in range(1000):
        opt.zero_grad()
        b.backward(L.clone().requires_grad_())
        opt.step()
    np.testing.assert_allclose((b.weights(L) * L).detach().numpy(), [1.0, 1.0], rtol=1e-3)


@pytest.mark.parametrize("dist", ["normal", "uniform", "dirichlet"])
def test_rlw_weights_sum_to_one_and_change(dist):
    torch.manual_seed(0)
    b = balancing.create("rlw", num_tasks=4, distribution=dist)
    ws = torch.stack([b.weights(torch.ones(4)) for _ in range(200)])
    assert (ws > 0).all()
    np.testing.assert_allclose(ws.sum(1).numpy(), 1.0, rtol=1e-6)
    assert ws.std(0).min() > 0.01
    np.testing.assert_allclose(ws.mean(0).numpy(), 0.25, atol=0.03)  # exchangeable tasks


def test_famo_shifts_weight_to_the_slowest_task_with_adam():
    b = balancing.create("famo", num_tasks=3)
    # published NYUv2 settings: gamma 0.001 (run.sh), logit lr 0.025, no clip (the official
    # clip runs before backward), logits updated from the SAME batch's losses after the step
    assert (b.gamma, b.lr, b.max_norm) == (0.001, 0.025, 0.0)
    assert b.needs == {"losses_after_step"}
    w0 = b.weights(torch.tensor([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(w0.numpy(), [1 / 3] * 3, rtol=1e-6)
    # weights() alone never moves the logits: the update waits for the losses after the step
    b.weights(torch.tensor([1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(b.logits.numpy(), [0.0, 0.0, 0.0])
    calls = []

    def after():
        calls.append(1)
        return torch.tensor([0.5, 0.9, 0.6])  # task 1 decreased slowest

    b.after_step({"losses_after_step": after})
    assert calls == [1]
    z = b.z()
    assert int(z.argmax()) == 1 and int(z.argmin()) == 0
    # the logit step is torch's Adam(lr=0.025, weight_decay=0.001) on J_softmax^T delta
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=0.025, weight_decay=0.001)
    delta = torch.log(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) + 1e-8) - torch.log(
        torch.tensor([0.5, 0.9, 0.6], dtype=torch.float64) + 1e-8)
    (xi.grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, delta)
    opt.step()
    np.testing.assert_allclose(b.logits.numpy(), xi.detach().numpy(), rtol=1e-10)
    # the loss weights make the step the gradient of sum z log L / c: w_t = z_t / (c L_t)
    L = torch.tensor([0.4, 0.8, 0.5])
    w = b.weights(L).double()
    z = b.z()
    np.testing.assert_allclose(w.numpy(), (z / L.double() / (z / L.double()).sum()).numpy(),
                               rtol=1e-6)


def test_famo_next_batch_variant_updates_from_the_next_steps_losses():
    b = balancing.create("famo", num_tasks=3, losses_after="next_batch")
    assert b.needs == frozenset()
    b.weights(torch.tensor([1.0, 1.0, 1.0]))
    b.weights(torch.tensor([0.5, 0.9, 0.6]))  # plays the losses after the first step
    assert int(b.z().argmax()) == 1
    with pytest.raises(ConfigError, match="losses_after"):
        balancing.create("famo", num_tasks=3, losses_after="held_out")


def test_weights_of_gradient_methods_reproduce_update():
    """Wherever a method reports weights, its update is ``w @ G`` (except DB-MTL, on its EMA)."""
    G = rand_matrices(3, 1, seed=70)[0]
    for name in GRADIENT_METHODS:
        if name in ("graddrop", "dbmtl"):
            continue
        b = balancing.create(name, num_tasks=3)
        d = b.aggregate(G, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        assert torch.isfinite(d).all(), name
        np.testing.assert_allclose(d.numpy(), (b.last_weights @ G).numpy(), rtol=1e-9,
                                   err_msg=name)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_degenerate_matrices_give_finite_updates(name):
    b = balancing.create(name, num_tasks=3)
    for G in (torch.zeros(3, 5), torch.ones(3, 5), torch.tensor([[1.0, 0], [0, 0], [-1.0, 0]])):
        d = b.aggregate(G, torch.ones(3))
        assert d.shape == (G.shape[1],) and torch.isfinite(d).all(), (name, G)


def test_single_task_is_plain_gradient_descent():
    G = torch.tensor([[1.0, -2.0, 3.0]])
    for name in GRADIENT_METHODS:
        if name in ("nashmtl", "aligned-mtl", "dbmtl", "cagrad"):
            continue  # these rescale even a single gradient
        d = balancing.create(name, num_tasks=1).aggregate(G, torch.ones(1))
        np.testing.assert_allclose(d.numpy(), G[0].numpy(), rtol=1e-6, err_msg=name)
    assert math.isfinite(float(balancing.create("nashmtl", num_tasks=1).aggregate(G).sum()))
