"""The balancers LibMTL and torchjd have besides the classic ones (GLS, STCH, MoCo, ExcessMTL,
FairGrad, SDMGrad, MoDo, ConFIG, DualProj): each against its paper's property or an independent
computation, plus the generic checks every balancer passes (on a bare matrix and on a model)."""

from __future__ import annotations

import copy
import io
import itertools

import numpy as np
import pytest
import torch

from mtlcv import balancing
from mtlcv.balancing.fairgrad import alpha_fair_weights
from mtlcv.balancing.solvers import min_norm_simplex, nash_bargaining
from mtlcv.errors import ConfigError
from test_balancing_model import TinyHPS, losses_of, make_batch, reference

GRADIENT = ["config", "dualproj", "excessmtl", "fairgrad", "moco", "modo", "sdmgrad"]
WEIGHTING = ["gls", "stch"]


def rand_matrices(T: int, n: int, P: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        G = torch.randn(T, P, generator=g, dtype=torch.float64)
        if k % 3 == 0:  # a task roughly opposite to another
            G[1] = -G[0] + 0.3 * torch.randn(P, generator=g, dtype=torch.float64)
        out.append(G)
    return out


def simplex_grid(T: int, n: int) -> np.ndarray:
    pts = [c for c in itertools.product(range(n + 1), repeat=T - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], dtype=float) / n


def test_registered_with_their_families():
    for name in GRADIENT:
        assert balancing.create(name, num_tasks=3).family == "aggregation"
    for name in WEIGHTING:
        assert balancing.create(name, num_tasks=3).family == "weighting"


@pytest.mark.parametrize("name,options,match", [
    ("stch", {"mu": 0}, "mu"), ("stch", {"warmup_epochs": -1}, "warmup_epochs"),
    ("fairgrad", {"alpha": 0}, "alpha"), ("sdmgrad", {"niter": 0}, "niter"),
    ("modo", {"samples": "three"}, "samples"), ("moco", {"beta": 0}, "beta"),
    ("excessmtl", {"step_size": -1}, "step_size"), ("dualproj", {"reg_eps": -1}, "reg_eps"),
    ("config", {"c": 1}, "no option 'c'"),
])
def test_bad_options_are_config_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        balancing.create(name, num_tasks=2, **options)


# ---------------------------------------------------------------- GLS
def test_gls_is_the_gradient_of_the_geometric_mean_and_scale_free():
    torch.manual_seed(0)
    x = torch.randn(5, requires_grad=True)
    A = torch.randn(3, 5)
    b = balancing.create("gls", num_tasks=3)

    def losses(scale):
        return torch.stack([((A[t] * x).sum() - t) ** 2 + 0.5 for t in range(3)]) * scale

    b.backward(losses(torch.ones(3)))
    got = x.grad.clone()
    (want,) = torch.autograd.grad(losses(torch.ones(3)).prod() ** (1 / 3), x)
    torch.testing.assert_close(got, want)
    # rescaling one loss by c rescales the update by c^(1/T), direction unchanged
    x.grad = None
    b.backward(losses(torch.tensor([8.0, 1.0, 1.0])))
    torch.testing.assert_close(x.grad, 2.0 * got)


# ---------------------------------------------------------------- STCH
def test_stch_warms_up_on_log_losses_then_sets_the_nadir_point():
    b = balancing.create("stch", num_tasks=3, warmup_epochs=1)
    L = torch.tensor([0.5, 2.0, 4.0])
    np.testing.assert_allclose(b.weights(L).numpy(), 1 / L.numpy(), rtol=1e-6)  # grad sum log L
    b.on_epoch_end(0, [9.0, 9.0, 9.0])
    assert not bool(b.has_nadir)  # still warming up: epoch 2 collects the nadir point
    b.on_epoch_end(1, [1.0, 2.0, 8.0])
    assert bool(b.has_nadir) and b.nadir.tolist() == [1.0, 2.0, 8.0]
    b.on_epoch_end(2, [5.0, 5.0, 5.0])
    assert b.nadir.tolist() == [1.0, 2.0, 8.0]  # set once


def test_stch_is_a_smooth_upper_bound_of_tchebycheff_with_the_softmax_gradient():
    torch.manual_seed(1)
    x = torch.randn(4, requires_grad=True)
    A = torch.rand(3, 4) + 0.1
    for mu in (1.0, 0.1, 0.01):
        b = balancing.create("stch", num_tasks=3, mu=mu, warmup_epochs=0)
        b.on_epoch_end(0, [1.0, 0.5, 2.0])
        L = torch.stack([(A[t] * x).square().sum() for t in range(3)])
        ell = torch.log(L.detach() / b.nadir.float())
        g = float(b.scalarized(L.detach())) / 3  # without the factor T
        mx = float(ell.max())
        assert mx <= g + 1e-6 and g <= mx + mu * np.log(3) + 1e-6  # Proposition 3.3
        x.grad = None
        b.backward(L)
        (want,) = torch.autograd.grad(b.scalarized(
            torch.stack([(A[t] * x).square().sum() for t in range(3)])), x)
        torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-7)
    # mu -> 0: the weight goes to the worst normalised task alone
    s = b.weights(L.detach()) * (L.detach() + 1e-20) / 3
    assert int(s.argmax()) == int(ell.argmax()) and float(s.max()) > 0.99


# ---------------------------------------------------------------- MoCo
def test_moco_tracks_gradients_and_projects_its_weights():
    b = balancing.create("moco", num_tasks=3, beta=0.5, beta_sigma=0.5, gamma=0.2,
                         gamma_sigma=0.5, rho=0.1)
    y = np.zeros((3, 7))
    lam = np.full(3, 1 / 3)
    from mtlcv.balancing.solvers import project_simplex

    for k, G in enumerate(rand_matrices(3, 5, seed=3), start=1):
        d = b.aggregate(G).numpy()
        g = G.numpy()
        y = y - 0.5 / k**0.5 * (y - g)
        lam = project_simplex(lam - 0.2 / k**0.5 * ((y @ y.T + 0.1 * np.eye(3)) @ lam))
        np.testing.assert_allclose(b.lambd.numpy(), lam, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(d, lam @ y, rtol=1e-10, atol=1e-12)


def test_moco_converges_to_mgda_on_the_mean_of_noisy_gradients():
    """The point of tracking: MGDA's weights of the *expected* gradients, not of each sample's."""
    g = torch.Generator().manual_seed(4)
    Gbar = torch.tensor([[1.0, 0.2, 0.0, 0.1], [-0.4, 1.0, 0.3, 0.0]], dtype=torch.float64)
    b = balancing.create("moco", num_tasks=2, beta=0.05, gamma=0.05)
    for _ in range(3000):
        b.aggregate(Gbar + 0.5 * torch.randn(2, 4, generator=g, dtype=torch.float64))
    want = min_norm_simplex((Gbar @ Gbar.T).numpy())
    np.testing.assert_allclose(b.lambd.numpy(), want, atol=0.05)


# ---------------------------------------------------------------- ExcessMTL
def test_excessmtl_matches_its_recurrence_and_favours_the_larger_excess_risk():
    b = balancing.create("excessmtl", num_tasks=3, step_size=0.5)
    acc = np.zeros((3, 7))
    w = np.ones(3)
    first = None
    for G in rand_matrices(3, 4, seed=5):
        d = b.aggregate(G).numpy()
        g = G.numpy()
        acc += g * g
        e = (g * g / np.sqrt(acc + 1e-7)).sum(1)
        if first is None:
            first = e
        else:
            w = w * np.exp(0.5 * e / first)
            w = 3 * w / w.sum()
        np.testing.assert_allclose(b.last_weights.numpy(), w, rtol=1e-10)
        np.testing.assert_allclose(d, w @ g, rtol=1e-10)
    # a task whose gradient stays large relative to its history gains weight
    b = balancing.create("excessmtl", num_tasks=2)
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b.aggregate(base)
    for k in range(20):
        b.aggregate(base * torch.tensor([[1.0], [0.5 ** (k + 1)]], dtype=torch.float64))
    w = b.last_weights
    assert float(w[0]) > float(w[1]) and float(w.sum()) == pytest.approx(2.0)


# ---------------------------------------------------------------- FairGrad
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_weights_solve_the_alpha_fair_condition(alpha):
    b = balancing.create("fairgrad", num_tasks=3, alpha=alpha)
    for G in rand_matrices(3, 10, P=9, seed=6):
        d = b.aggregate(G)
        w = b.last_weights.numpy()
        u = (G @ d).numpy()  # utilities g_t . d
        assert (w > 0).all() and (u > 0).all()
        np.testing.assert_allclose(u, w ** (-1 / alpha), rtol=1e-6)


def test_fairgrad_alpha_one_is_nash_and_larger_alpha_equalises_utilities():
    G = torch.tensor([[3.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, 0.3, 0.2]], dtype=torch.float64)
    M = (G @ G.T).numpy()
    w1, ok = alpha_fair_weights(M, 1.0)
    a, ok2 = nash_bargaining(M)
    assert ok and ok2
    np.testing.assert_allclose(w1, a, rtol=1e-6)
    worst = []
    for alpha in (0.5, 1.0, 2.0, 8.0, 50.0):
        w, ok = alpha_fair_weights(M, alpha)
        assert ok
        d = G.numpy().T @ w
        worst.append((G.numpy() @ d / np.linalg.norm(d)).min())
    # towards max-min fairness: the least-improved task's rate (unit step) keeps growing
    assert all(a < b for a, b in zip(worst, worst[1:]))


def test_fairgrad_maximises_the_alpha_fair_utility_in_its_ball():
    """Ban & Ji, sec. 3: among directions of the same norm, d maximises sum u^(1-a)/(1-a)."""
    alpha = 2.0
    G = rand_matrices(2, 1, P=2, seed=7)[0]
    d = balancing.create("fairgrad", num_tasks=2, alpha=alpha).aggregate(G).numpy()
    r = np.linalg.norm(d)
    th = np.linspace(0, 2 * np.pi, 20001)
    D = r * np.stack([np.cos(th), np.sin(th)], 1)
    U = D @ G.numpy().T
    ok = (U > 0).all(1)
    util = lambda u: (u ** (1 - alpha) / (1 - alpha)).sum(-1)  # noqa: E731
    assert util(G.numpy() @ d) >= util(U[ok]).max() - 1e-6


# ---------------------------------------------------------------- MoDo and SDMGrad
def test_modo_step_is_the_papers_update_with_double_sampling():
    b = balancing.create("modo", num_tasks=3, gamma=0.05, rho=0.1)
    G1, G2, G3 = rand_matrices(3, 3, seed=8)
    lam0 = b.lambd.numpy().copy()
    d = b.aggregate_samples(G1, G2, G3).numpy()
    from mtlcv.balancing.solvers import project_simplex

    lam = project_simplex(lam0 - 0.05 * ((G1 @ G2.T).numpy() @ lam0 + 0.1 * lam0))
    np.testing.assert_allclose(b.lambd.numpy(), lam, rtol=1e-12)
    np.testing.assert_allclose(d, lam @ G3.numpy(), rtol=1e-12)
    # in a run, the previous step's G is the first sample
    b = balancing.create("modo", num_tasks=3, gamma=0.05, rho=0.1)
    ref = balancing.create("modo", num_tasks=3, gamma=0.05, rho=0.1)
    b.aggregate(G1)
    ref.aggregate_samples(G1, G1, G1)
    np.testing.assert_allclose(b.aggregate(G2).numpy(),
                               ref.aggregate_samples(G1, G2, G2).numpy(), rtol=1e-12)
    same = balancing.create("modo", num_tasks=3, gamma=0.05, rho=0.1, samples="same")
    same.aggregate(G1)
    ref2 = balancing.create("modo", num_tasks=3, gamma=0.05, rho=0.1)
    ref2.aggregate_samples(G1, G1, G1)
    np.testing.assert_allclose(same.aggregate(G2).numpy(),
                               ref2.aggregate_samples(G2, G2, G2).numpy(), rtol=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_modo_weights_converge_to_regularised_min_norm(rho):
    G = rand_matrices(3, 1, P=6, seed=9)[0]
    b = balancing.create("modo", num_tasks=3, gamma=0.02, rho=rho, samples="same")
    for _ in range(20000):
        b.aggregate(G)
    A = (G @ G.T).numpy() + rho * np.eye(3)
    grid = simplex_grid(3, 300)
    vals = np.einsum("ni,ij,nj->n", grid, A, grid)
    lam = b.lambd.numpy()
    assert lam @ A @ lam <= vals.min() + 1e-9


def test_sdmgrad_inner_problem_and_direction():
    T, lamda = 3, 0.4
    for G in rand_matrices(T, 4, P=6, seed=10):
        b = balancing.create("sdmgrad", num_tasks=T, lamda=lamda, niter=3000, inner_lr=0.05,
                             samples="same")
        d = b.aggregate(G).numpy()
        g = G.numpy()
        w = b.w.numpy()
        # w minimises 1/2 ||G^T w + lamda g0||^2 on the simplex (grid check)
        grid = simplex_grid(T, 300)
        g0 = g.mean(0)
        obj = lambda W: 0.5 * np.square(W @ g + lamda * g0).sum(-1)  # noqa: E731,B023
        assert obj(w[None])[0] <= obj(grid).min() + 1e-8
        np.testing.assert_allclose(d, (w @ g + lamda * g0) / (1 + lamda), rtol=1e-10)
    # lamda = 0 is MGDA (min-norm point); a huge lamda is the mean gradient
    G = rand_matrices(T, 1, seed=11)[0]
    b = balancing.create("sdmgrad", num_tasks=T, lamda=0.0, niter=3000, inner_lr=0.05,
                         samples="same")
    b.aggregate(G)
    np.testing.assert_allclose(b.w.numpy(), min_norm_simplex((G @ G.T).numpy()), atol=1e-4)
    big = balancing.create("sdmgrad", num_tasks=T, lamda=1e6, samples="same")
    np.testing.assert_allclose(big.aggregate(G).numpy(), G.mean(0).numpy(), atol=1e-5)
    # the official step (lr 10) on the normalised Gramian does not settle: it jumps between
    # vertices, which a converged solver would not do
    off = balancing.create("sdmgrad", num_tasks=T, lamda=0.4, niter=2000, samples="same")
    ws = []
    for n in (2000, 2001):
        off.w.fill_(1 / T)
        ws.append(off.inner_weights((G @ G.T).numpy(), n))
    assert np.abs(ws[0] - ws[1]).max() > 0.1


def test_sdmgrad_uses_the_official_projected_sgd_with_momentum():
    C = np.array([[2.0, 0.3], [0.1, 1.0]])
    b = balancing.create("sdmgrad", num_tasks=2, lamda=0.3, niter=5)
    got = b.inner_weights(C)
    # torch.optim.SGD(lr=10, momentum=0.5) + projection, as the official code
    from mtlcv.balancing.solvers import project_simplex

    Cs = C / (np.mean(np.sqrt(np.diag(C) + 1e-4)) ** 2 + 1e-8)
    w = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=10, momentum=0.5)
    for _ in range(5):
        opt.zero_grad()
        w.grad = torch.from_numpy(Cs @ w.detach().numpy() + 0.3 * Cs.mean(1))
        opt.step()
        w.data.copy_(torch.from_numpy(project_simplex(w.detach().numpy())))
    np.testing.assert_allclose(got, w.detach().numpy(), rtol=1e-12)


# ---------------------------------------------------------------- ConFIG and DualProj
@pytest.mark.parametrize("T", [2, 3, 5])
def test_config_equal_cosines_and_the_official_formula(T):
    b = balancing.create("config", num_tasks=T)
    for G in rand_matrices(T, 10, P=T + 3, seed=12 + T):
        G = G * torch.logspace(-1, 1, T, dtype=torch.float64)[:, None]
        d = b.aggregate(G)
        cos = (G @ d) / (G.norm(dim=1) * d.norm())
        np.testing.assert_allclose(cos.numpy(), float(cos[0]), rtol=1e-7)
        assert float(cos[0]) > 0
        # torchjd / conflictfree: pinv of the unit gradients, then length = sum of projections
        U = G / G.norm(dim=1, keepdim=True)
        v = torch.linalg.pinv(U) @ torch.ones(T, dtype=torch.float64)
        u = v / v.norm()
        np.testing.assert_allclose(d.numpy(), ((G @ u).sum() * u).numpy(), rtol=1e-7,
                                   atol=1e-10)


def test_dualproj_projects_the_mean_onto_the_dual_cone():
    b = balancing.create("dualproj", num_tasks=3, reg_eps=0.0)
    G = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.4, 2.0]], dtype=torch.float64)
    np.testing.assert_allclose(b.aggregate(G).numpy(), G.mean(0).numpy(), rtol=1e-10)
    for G in rand_matrices(3, 20, P=5, seed=13):
        d = b.aggregate(G).numpy()
        g, m = G.numpy(), G.mean(0).numpy()
        assert (g @ d >= -1e-9 * np.abs(g).max() ** 2).all()  # no conflict
        # KKT of min ||x - m||^2 s.t. G x >= 0: x - m = G^T mu, mu >= 0, mu_t (g_t . x) = 0
        mu, *_ = np.linalg.lstsq(g.T, d - m, rcond=None)
        np.testing.assert_allclose(g.T @ mu, d - m, atol=1e-8)
        assert (mu >= -1e-8).all() and np.abs(mu * (g @ d)).max() < 1e-7


# ---------------------------------------------------------------- generic checks
def test_weights_reproduce_the_update():
    G = rand_matrices(3, 1, seed=70)[0]
    for name in GRADIENT:
        if name == "moco":  # weights of the tracked gradients
            continue
        b = balancing.create(name, num_tasks=3)
        d = b.aggregate(G, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        np.testing.assert_allclose(d.numpy(), (b.last_weights @ G).numpy(), rtol=1e-9,
                                   err_msg=name)


@pytest.mark.parametrize("name", GRADIENT)
def test_degenerate_matrices_give_finite_updates(name):
    for G in (torch.zeros(3, 5), torch.ones(3, 5), torch.tensor([[1.0, 0], [0, 0], [-1.0, 0]])):
        b = balancing.create(name, num_tasks=3)
        for _ in range(2):
            d = b.aggregate(G, torch.ones(3))
            assert d.shape == (G.shape[1],) and torch.isfinite(d).all(), (name, G)


def test_single_task_is_plain_gradient_descent():
    G = torch.tensor([[1.0, -2.0, 3.0]])
    for name in ("config", "dualproj", "excessmtl", "modo", "sdmgrad"):
        d = balancing.create(name, num_tasks=1).aggregate(G, torch.ones(1))
        np.testing.assert_allclose(d.numpy(), G[0].numpy(), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("mode", ["param", "rep"])
@pytest.mark.parametrize("name", GRADIENT)
def test_backward_on_a_model_writes_the_aggregate_of_the_exact_jacobian(name, mode):
    opts = {"max_norm": 0.0} if name in ("fairgrad", "sdmgrad") else {}
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    b = balancing.create(name, num_tasks=3, mode=mode, **opts)
    ref = copy.deepcopy(b)
    model.zero_grad(set_to_none=True)
    b.backward(losses_of(model, x, targets), model)
    got = torch.cat([p.grad.flatten() for p in model.trunk.parameters()])
    raw = losses_of(model, x, targets)
    G_ref, heads_ref = reference(model, raw, mode)
    d = ref.aggregate(G_ref, raw.detach())
    if mode == "rep":  # the representation's update, backpropagated through the trunk
        d = torch.cat([g.flatten() for g in torch.autograd.grad(
            model.representation, list(model.trunk.parameters()),
            d.view_as(model.representation).to(model.representation), retain_graph=True)])
    torch.testing.assert_close(got, d.to(got), rtol=1e-4, atol=1e-6)
    coeffs = ref.last_weights if b.scale_task_params else torch.ones(3)
    for t, head in enumerate(model.heads.values()):
        for p, g in zip(head.parameters(), heads_ref[t]):
            torch.testing.assert_close(p.grad, coeffs[t].to(g) * g, rtol=1e-4, atol=1e-6)


def test_fairgrad_and_sdmgrad_clip_the_shared_gradient():
    for name in ("fairgrad", "sdmgrad"):
        torch.manual_seed(0)
        model = TinyHPS()
        x, targets = make_batch()
        balancing.create(name, num_tasks=3, max_norm=0.01).backward(
            losses_of(model, x, targets), model)
        norm = torch.cat([p.grad.flatten() for p in model.trunk.parameters()]).norm()
        assert float(norm) == pytest.approx(0.01, rel=1e-4)


STATEFUL = {"stch": {"warmup_epochs": 0}, "moco": {}, "excessmtl": {"step_size": 0.5},
            "modo": {"gamma": 0.1}, "sdmgrad": {}}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_survives_a_save_load_round_trip(name):
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    make = lambda: balancing.create(name, num_tasks=3, **STATEFUL[name])  # noqa: E731
    b = make()

    def step(bal, scale):
        model.zero_grad(set_to_none=True)
        logs = bal.backward(losses_of(model, x, [y * scale for y in targets]), model)
        return logs, torch.cat([p.grad.flatten() for p in model.parameters()])

    for k in range(3):
        step(b, 1 + k)
        b.on_epoch_end(k, [3.0 - k, 2.0, 1.0 + k], [0.5] * 3)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buf))
    logs, grads = step(b, 0.5)
    logs2, grads2 = step(restored, 0.5)
    assert logs == logs2 and torch.equal(grads, grads2)
    logs3, grads3 = step(make(), 0.5)
    assert logs3 != logs or not torch.equal(grads3, grads)
