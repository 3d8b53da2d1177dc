"""Auto-λ (balancing/autol.py): the meta-gradient is the true lookahead gradient, the meta step
leaves the model as it found it, a noise task's weight falls, and the trainer hands it a
held-out batch and its optimizer through the step contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mtlcv import balancing
from mtlcv.balancing.autol import AutoLambda, virtual_step
from mtlcv.config import from_dict
from mtlcv.engine import closures
from mtlcv.engine.closures import StepContext, before_backward
from mtlcv.engine.trainer import Trainer
from mtlcv.errors import ConfigError


def _toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _losses_of(model):
    def losses_of(batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(0)

    return losses_of


def _closures(b, model, batch, heldout, opt):
    ctx = StepContext(batch, _losses_of(model), heldout=lambda: heldout, optimizer=opt)
    return {name: closures.PROVIDERS[name](ctx) for name in b.needs}


def _sgd_with_momentum(model):
    """SGD with momentum and weight decay, one step taken (so momentum buffers exist)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    torch.manual_seed(5)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _true_meta_gradient(model, opt, lam, batch, heldout, mask):
    """``∇_λ L_val(θ'(λ))`` by autograd through the virtual step (second order, no shortcut)."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    lam = lam.clone().requires_grad_(True)
    x, y = batch
    out = functional_call(model, ({**params}, {**buffers}), (x,))
    losses = ((out - y) ** 2).mean(0)
    grads = torch.autograd.grad((lam * losses).sum(), list(params.values()), create_graph=True)
    g0 = opt.param_groups[0]
    new = {}
    for n, g in zip(names, grads):
        p = params[n]
        m = opt.state[p]["momentum_buffer"]
        new[n] = p - g0["lr"] * (g0["momentum"] * m + g + g0["weight_decay"] * p)
    xv, yv = heldout
    val = ((functional_call(model, (new, {**buffers}), (xv,)) - yv) ** 2).mean(0)
    return torch.autograd.grad((val * mask).sum(), lam)[0]


@pytest.mark.parametrize("meta_grad", ["exact", "finite_difference"])
def test_meta_gradient_is_the_lookahead_gradient(meta_grad):
    model = _toy()
    opt = _sgd_with_momentum(model)
    torch.manual_seed(1)
    batch = (torch.randn(16, 4), torch.randn(16, 3))
    heldout = (torch.randn(16, 4), torch.randn(16, 3))
    b = AutoLambda(3, init=0.3, primary=[0, 2], meta_grad=meta_grad)
    truth = _true_meta_gradient(model, opt, b.meta_weights, batch, heldout, b.primary_mask)
    losses = _losses_of(model)(batch)
    got = b.meta_gradient(losses, model, _closures(b, model, batch, heldout, opt))
    assert truth.abs().max() > 1e-3  # a real signal, not zeros on both sides
    if meta_grad == "exact":  # no approximation: the same number up to float rounding
        torch.testing.assert_close(got, truth, rtol=1e-4, atol=1e-6)
    else:  # the official central difference with ||εv|| = 0.01
        torch.testing.assert_close(got, truth, rtol=2e-2, atol=1e-4)


def test_meta_step_leaves_the_model_and_its_graph_as_they_were():
    model = _toy()
    opt = _sgd_with_momentum(model)
    torch.manual_seed(2)
    batch = (torch.randn(16, 4), torch.randn(16, 3))
    heldout = (torch.randn(16, 4), torch.randn(16, 3))
    b = balancing.create("autol", num_tasks=3, lr=0.05)
    losses = _losses_of(model)(batch)
    state = copy.deepcopy(model.state_dict())
    before_backward(b, StepContext(batch, _losses_of(model), heldout=lambda: heldout,
                                   optimizer=opt))
    logs = b.backward(losses, model)  # the step's graph survives the meta step's passes
    for k, v in model.state_dict().items():  # parameters and BatchNorm statistics, bitwise
        assert torch.equal(v, state[k]), k
    lam = b.meta_weights.clone()
    assert not torch.equal(lam, torch.full((3,), 0.1))  # the meta step moved λ ...
    assert logs == {f"w{k}": float(v) for k, v in enumerate(lam.tolist())}
    # ... and the network's gradient is that of Σ λ_i L_i with the new λ
    ref = copy.deepcopy(model)
    ref.load_state_dict(state)
    ref.zero_grad()
    (lam * _losses_of(ref)(batch)).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_without_the_step_contract_lambda_stays():
    model = _toy()
    b = balancing.create("autol", num_tasks=3)
    b.backward(_losses_of(model)((torch.randn(8, 4), torch.randn(8, 3))), model)
    assert torch.equal(b.meta_weights, torch.full((3,), 0.1))


def test_virtual_step_is_the_sgd_step():
    """θ' of the virtual step is where torch's SGD (momentum, weight decay) goes next."""
    model = _toy()
    opt = _sgd_with_momentum(model)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    predicted = []
    for p in model.parameters():
        alpha, step = virtual_step(p, p.grad, opt.param_groups[0], opt.state[p])
        predicted.append(p.detach() - alpha * step)
    opt.step()
    for p, q in zip(model.parameters(), predicted):
        torch.testing.assert_close(p.detach(), q)


def test_meta_optimizer_is_adam():
    b = AutoLambda(3, lr=0.01)
    lam = torch.full((3,), 0.1, requires_grad=True)
    adam = torch.optim.Adam([lam], lr=0.01)
    torch.manual_seed(3)
    for _ in range(5):
        g = torch.randn(3)
        b.meta_update(g)
        lam.grad = g.clone()
        adam.step()
    torch.testing.assert_close(b.meta_weights, lam.detach())


def test_auxiliary_noise_task_loses_weight():
    """The paper's auxiliary-learning property (sec. 4, noise prediction): with task 0 primary,
    a task whose targets are fresh noise every batch is weighted down, a task that shares
    task 0's signal rises with the primary task."""
    torch.manual_seed(0)
    W = torch.randn(6, 1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    b = AutoLambda(3, init=0.5, lr=1e-2, primary=[0])

    def draw():
        x = torch.randn(32, 6)
        s = x @ W
        return x, torch.cat([s, 0.5 * s, 3 * torch.randn(32, 1)], 1)  # primary, related, noise

    for _ in range(300):
        batch, heldout = draw(), draw()
        losses = _losses_of(model)(batch)
        opt.zero_grad(set_to_none=True)
        before_backward(b, StepContext(batch, _losses_of(model), heldout=lambda h=heldout: h,
                                       optimizer=opt))
        b.backward(losses, model)
        opt.step()
    lam = b.meta_weights
    # seeds 0-3 end at λ_noise 0.10-0.25 while λ_primary, λ_related rise to 0.9-1.6
    assert lam[2] < 0.35, lam  # the noise task fell well below its initial 0.5
    assert lam[0] > 0.6 and lam[1] > 0.6, lam  # the primary and the related task rose


def test_bad_options_are_one_line_errors():
    for opts, key in [({"primary": [5]}, "primary"), ({"primary": "some"}, "primary"),
                      ({"meta_grad": "x"}, "meta_grad"), ({"lr": -1}, "lr"),
                      ({"init": "a"}, "init")]:
        with pytest.raises(ConfigError, match=f"balancer.options.{key}"):
            balancing.create("autol", num_tasks=3, **opts)


def test_torchrun_refuses_autol_in_one_line(monkeypatch):
    from mtlcv.engine import distributed

    b = balancing.create("autol", num_tasks=3)
    closures.check_needs(b)  # one process: fine
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(ConfigError, match="provides to one process only") as exc:
        closures.check_needs(b)
    assert "\n" not in str(exc.value)
    closures.check_needs(balancing.create("famo", num_tasks=3))  # FAMO still runs under DDP


def test_trainer_hands_autol_a_heldout_batch_and_its_optimizer(small_cfg, tmp_path, monkeypatch):
    cfg = copy.deepcopy(small_cfg)
    cfg["balancer"] = {"name": "autol", "options": {"lr": 0.01}}
    cfg["optim"] = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    cfg["train"].update(epochs=1, max_steps=3, threads=1)
    trainer = Trainer(from_dict(cfg), tmp_path / "run", log=lambda s: None)
    seen = []
    orig = AutoLambda.meta_gradient

    def spy(self, losses, model, cl):
        opt = cl["optimizer"]()
        held = trainer._heldout_batch()  # what the closure draws at this step (a pure function)
        seen.append((opt is trainer.optimizer, held["image"].clone()))
        return orig(self, losses, model, cl)

    images = []
    step = trainer.train_step

    def record(batch):
        images.append(batch["image"].clone())
        return step(batch)

    monkeypatch.setattr(AutoLambda, "meta_gradient", spy)
    trainer.train_step = record
    trainer.train_epoch()
    assert len(seen) == 3 and all(s[0] for s in seen)
    # a held-out batch is a training batch of another order: never the step's own, each new
    for (_, held), img in zip(seen, images):
        assert held.shape == img.shape and not torch.equal(held, img)
    assert not torch.equal(seen[0][1], seen[1][1])
    assert not torch.equal(trainer.balancer.meta_weights, torch.full((3,), 0.1))


def test_a_non_finite_meta_gradient_leaves_lambda_alone():
    model = _toy()
    opt = _sgd_with_momentum(model)
    batch = (torch.randn(16, 4), torch.randn(16, 3))
    heldout = (torch.randn(16, 4), torch.full((16, 3), float("nan")))
    b = balancing.create("autol", num_tasks=3)
    before_backward(b, StepContext(batch, _losses_of(model), heldout=lambda: heldout,
                                   optimizer=opt))
    logs = b.backward(_losses_of(model)(batch), model)
    assert logs["meta_skipped"] == 1.0
    assert torch.equal(b.meta_weights, torch.full((3,), 0.1)) and int(b.adam_steps) == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
