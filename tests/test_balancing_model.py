"""Balancers on small models: per-task gradients (jacobian.py), the gradients they leave, state
round trips, GradNorm, and a few methods through the real trainer."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from mtlcv import balancing
from mtlcv.balancing.jacobian import split_parameters, task_gradients

GRADIENT_METHODS = [
    "aligned-mtl", "cagrad", "dbmtl", "graddrop", "gradvac", "imtl", "imtl-g", "mgda",
    "mgda-ub", "nashmtl", "pcgrad", "upgrad",
]
WEIGHTING_METHODS = [
    "dtp", "dwa", "famo", "fixed", "gradnorm", "imtl-l", "rlw", "si", "uncertainty",
]


class TinyHPS(nn.Module):
    """Hard sharing: a conv trunk (with batch norm) and a 1x1-conv head per task.

    Follows the MultiTaskModel contract: ``forward`` stores the representation of the last
    forward as ``self.representation``.
    """

    has_representation = True

    def __init__(self, num_tasks: int = 3, width: int = 4) -> None:
        super().__init__()
        self.tasks = [f"t{i}" for i in range(num_tasks)]
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
        )
        self.heads = nn.ModuleDict({t: nn.Conv2d(width, 1 + i % 2, 1)
                                    for i, t in enumerate(self.tasks)})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_parameters(self, task):
        return self.heads[task].parameters()

    def encode(self, x):
        return self.trunk(x)

    def decode(self, z, size):
        return {t: self.heads[t](z) for t in self.tasks}

    def forward(self, x):
        z = self.encode(x)
        if self.has_representation:
            self.representation = z
        return self.decode(z, x.shape[-2:])


class NoRep(TinyHPS):
    """A model without a single shared representation (like soft sharing)."""

    has_representation = False


class Entangled(TinyHPS):
    """The heads also use a shared parameter besides the representation: not separable."""

    def __init__(self, num_tasks: int = 3) -> None:
        super().__init__(num_tasks)
        self.gain = nn.Parameter(torch.tensor(1.3))

    def shared_parameters(self):
        return [*self.trunk.parameters(), self.gain]

    def decode(self, z, size):
        return {t: self.heads[t](z * self.gain) for t in self.tasks}


def make_batch(T: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 5, generator=g)
    targets = [torch.randn(2, 1 + i % 2, 6, 5, generator=g) for i in range(T)]
    return x, targets


def losses_of(model, x, targets):
    preds = model(x)
    return torch.stack([((preds[t] - y) ** 2).mean() + 0.1 * i
                        for i, (t, y) in enumerate(zip(model.tasks, targets))])


def reference(model, losses, mode):
    """Per-task gradients by a plain loop of autograd.grad calls."""
    shared, own = split_parameters(model)
    rows, heads = [], []
    for t in range(len(losses)):
        if mode == "rep":
            (g,) = torch.autograd.grad(losses[t], model.representation, retain_graph=True)
            rows.append(g.flatten())
        else:
            gs = torch.autograd.grad(losses[t], shared, retain_graph=True)
            rows.append(torch.cat([x.flatten() for x in gs]))
        heads.append(torch.autograd.grad(losses[t], own[t], retain_graph=True))
    return torch.stack(rows), heads


def flat_grads(params):
    return torch.cat([p.grad.flatten() for p in params])


# ---------------------------------------------------------------- jacobian.py
@pytest.mark.parametrize("model_cls,mode,batched", [
    (TinyHPS, "param", True), (TinyHPS, "param", False), (TinyHPS, "rep", True),
    (TinyHPS, "rep", False), (NoRep, "param", True), (NoRep, "rep", False),
    (Entangled, "rep", True),
])
def test_batched_jacobian_equals_a_loop_of_autograd_grad(model_cls, mode, batched):
    torch.manual_seed(0)
    model = model_cls()
    x, targets = make_batch()
    losses = losses_of(model, x, targets)
    # without a separable representation the exact parameter space is used
    space = mode if model_cls is TinyHPS else "param"
    G_ref, heads_ref = reference(model, losses, space)
    tg = task_gradients(losses, model, mode, batched=batched)
    assert tg.mode == space
    torch.testing.assert_close(tg.matrix, G_ref, rtol=1e-5, atol=1e-7)
    # the heads' own gradients, through apply() with distinct task coefficients
    coeffs = torch.tensor([0.5, 2.0, -1.0])
    model.zero_grad(set_to_none=True)
    tg.apply(torch.zeros(tg.matrix.shape[1]), coeffs)
    _, own = split_parameters(model)
    for t in range(3):
        for p, g in zip(own[t], heads_ref[t]):
            torch.testing.assert_close(p.grad, coeffs[t] * g, rtol=1e-5, atol=1e-7)


def test_losses_not_built_by_stack_use_the_direct_path():
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    stacked = losses_of(model, x, targets)
    losses = torch.cat([stacked[t].view(1) for t in range(3)])
    G_ref, _ = reference(model, losses, "param")
    tg = task_gradients(losses, model, "rep")
    assert tg.mode == "param"
    torch.testing.assert_close(tg.matrix, G_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,model_cls", [("mgda", TinyHPS), ("mgda-ub", TinyHPS),
                                            ("pcgrad", NoRep)])
def test_the_graph_is_freed_after_backward(name, model_cls):
    """A graph kept alive would hold the step's activations through the next forward pass."""
    torch.manual_seed(0)
    model = model_cls()
    x, targets = make_batch()
    b = balancing.create(name, num_tasks=3)
    b.backward(losses_of(model, x, targets), model)  # the first step may keep it (probing vmap)
    losses = losses_of(model, x, targets)
    b.backward(losses, model)
    if not model.has_representation:
        with pytest.raises(RuntimeError, match="second time"):
            losses.sum().backward()
        return
    with pytest.raises(RuntimeError, match="second time"):  # the encoder's part
        torch.autograd.grad(model.representation.sum(), model.trunk[0].weight)
    with pytest.raises(RuntimeError, match="second time"):  # the heads' part
        torch.autograd.grad(losses.sum(), model.representation)


@pytest.mark.parametrize("name,model_cls", [("mgda", TinyHPS), ("mgda-ub", TinyHPS),
                                            ("pcgrad", NoRep), ("upgrad", Entangled)])
def test_unused_parameters_keep_no_grad_like_a_plain_backward(name, model_cls):
    torch.manual_seed(0)
    model = model_cls()
    model.trunk.register_parameter("unused", nn.Parameter(torch.ones(3)))
    model.heads["t1"].register_parameter("unused", nn.Parameter(torch.ones(2)))
    x, targets = make_batch()
    losses_of(model, x, targets).sum().backward()
    plain = {n for n, p in model.named_parameters() if p.grad is None}
    assert plain == {"trunk.unused", "heads.t1.unused"}
    model.zero_grad(set_to_none=True)
    balancing.create(name, num_tasks=3).backward(losses_of(model, x, targets), model)
    assert {n for n, p in model.named_parameters() if p.grad is None} == plain


def test_representation_update_is_backpropagated_through_the_encoder():
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    losses = losses_of(model, x, targets)
    tg = task_gradients(losses, model, "rep")
    d = torch.randn(tg.matrix.shape[1])
    shared = list(model.shared_parameters())
    expect = torch.autograd.grad(model.representation, shared, d.view_as(model.representation),
                                 retain_graph=True)
    tg.apply(d, torch.ones(3))
    for p, e in zip(shared, expect):
        torch.testing.assert_close(p.grad, e)


def test_split_parameters_claims():
    model = Entangled()
    shared, own = split_parameters(model)
    assert any(p is model.gain for p in shared)
    assert sum(p.numel() for p in shared) + sum(p.numel() for ps in own for p in ps) == sum(
        p.numel() for p in model.parameters())


# ---------------------------------------------------------------- every method on a model
@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("mode", ["param", "rep"])
def test_gradient_method_backward_writes_its_aggregate(name, mode):
    opts = {"max_norm": 0.0} if name == "nashmtl" else {}
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    b = balancing.create(name, num_tasks=3, mode=mode, **opts)
    ref_b = copy.deepcopy(b)
    losses = losses_of(model, x, targets)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    logs = b.backward(losses, model)
    assert all(np.isfinite(float(v)) for v in logs.values())  # floats or 0-d tensors
    params = list(model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    got = flat_grads(model.trunk.parameters())
    # the same method on the loop-computed Jacobian of the same (transformed) losses
    raw = losses_of(model, x, targets)
    scale = ref_b.loss_scale(raw)  # DB-MTL: gradients of log L; IMTL: of exp(s) L
    losses = raw if scale is None else raw * scale
    G_ref, heads_ref = reference(model, losses, mode)
    torch.manual_seed(1)
    if name == "graddrop" and mode == "rep":
        rep = model.representation
        d = ref_b.aggregate(G_ref, signs=torch.sign(rep.detach()).flatten(), batch=rep.shape[0])
    else:
        d = ref_b.aggregate(G_ref, raw.detach())
    if mode == "rep":
        d = torch.cat([g.flatten() for g in torch.autograd.grad(
            model.representation, list(model.trunk.parameters()),
            d.view_as(model.representation), retain_graph=True)])
    torch.testing.assert_close(got, d, rtol=1e-4, atol=1e-6)
    coeffs = ref_b.last_weights if b.scale_task_params else torch.ones(3)
    for t, head in enumerate(model.heads.values()):
        for p, g in zip(head.parameters(), heads_ref[t]):
            torch.testing.assert_close(p.grad, coeffs[t] * g, rtol=1e-4, atol=1e-6)
    for p in b.parameters():  # IMTL's learnable scales
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", GRADIENT_METHODS + WEIGHTING_METHODS)
def test_every_method_leaves_finite_grads_on_every_parameter(name):
    """On a model whose heads also use a shared parameter (no representation shortcut)."""
    torch.manual_seed(0)
    model = Entangled()
    b = balancing.create(name, num_tasks=3)
    x, targets = make_batch()
    for step in range(2):
        model.zero_grad(set_to_none=True)
        b.backward(losses_of(model, x, targets), model)
        b.on_epoch_end(step, [1.0, 2.0, 3.0], [0.2, 0.5, 0.9])
        for n, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        for p in b.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_nashmtl_shared_update_has_squared_norm_T_before_clipping():
    """The official Nash-MTL update: sum_t alpha_t grad L_t with alpha_i (G G^T alpha)_i = 1, so
    on the shared parameters ||d||^2 = alpha^T G G^T alpha = T before the clip; the heads get
    alpha_t times their own gradient (the official code backpropagates sum alpha_t L_t)."""
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    losses = losses_of(model, x, targets)
    G = torch.stack([flat_grad(l, model.trunk.parameters()) for l in losses])
    heads = [flat_grad(losses[t], model.heads[n].parameters()) for t, n in enumerate(model.tasks)]
    model.zero_grad(set_to_none=True)
    b = balancing.create("nashmtl", num_tasks=3, max_norm=0.0)
    b.backward(losses, model)
    d = flat_grads(model.trunk.parameters())
    assert float(d.double() @ d.double()) == pytest.approx(3.0, rel=1e-4)
    a = b.last_weights
    torch.testing.assert_close(d, a.to(G) @ G, rtol=1e-4, atol=1e-7)
    for t, n in enumerate(model.tasks):
        torch.testing.assert_close(flat_grads(model.heads[n].parameters()), a[t] * heads[t],
                                   rtol=1e-4, atol=1e-7)


def flat_grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params),
                                                               retain_graph=True)])


def test_nashmtl_and_famo_clip_the_shared_gradient():
    for name in ("nashmtl", "famo"):
        torch.manual_seed(0)
        model = TinyHPS()
        x, targets = make_batch()
        b = balancing.create(name, num_tasks=3, max_norm=0.01)
        b.backward(losses_of(model, x, targets), model)
        norm = flat_grads(model.trunk.parameters()).norm()
        assert float(norm) == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------- GradNorm
def test_gradnorm_moves_weights_toward_target_ratios_and_sums_to_T():
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    b = balancing.create("gradnorm", num_tasks=3, alpha=1.5)
    W = model.trunk[3].weight  # the last shared layer's weight
    assert b.last_shared_weight(model) is W
    with torch.no_grad():
        b.w.copy_(torch.tensor([2.0, 0.5, 0.5]))
    for step in range(2):
        model.zero_grad(set_to_none=True)
        b.w.grad = None
        losses = losses_of(model, x, targets) * (1.0 if step == 0 else torch.tensor([0.5, 1, 1]))
        norms = torch.stack([torch.autograd.grad(losses[t], W, retain_graph=True)[0].norm()
                             for t in range(3)]).detach()
        logs = b.backward(losses, model)
        w = b.w.detach().clone()
        assert float(w.sum()) == pytest.approx(3.0)  # renormalised before use
        if step == 0:
            L0 = losses.detach()
        ratio = losses.detach() / L0
        r = ratio / ratio.mean()

        def l_grad(w, norms=norms, r=r):
            G = w * norms
            return float((G - G.mean() * r**1.5).abs().sum())

        assert logs["gradnorm_loss"] == pytest.approx(l_grad(w), rel=1e-5)
        G = w * norms
        torch.testing.assert_close(b.w.grad, torch.sign(G - G.mean() * r**1.5) * norms)
        # a small gradient step, renormalised, lowers L_grad
        w_new = w - 0.05 * b.w.grad / b.w.grad.abs().max()
        w_new = 3 * w_new / w_new.sum()
        assert l_grad(w_new) < l_grad(w)
        with torch.no_grad():
            b.w.copy_(w_new)
    # the network was updated with the weighted sum of the losses
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- state round trips
STATEFUL = {
    "dwa": {}, "dtp": {}, "gradnorm": {}, "uncertainty": {}, "imtl-l": {}, "imtl": {},
    "famo": {}, "nashmtl": {"update_weights_every": 2}, "gradvac": {"beta": 0.3}, "dbmtl": {},
}


def run_step(b, model, x, targets, seed):
    from mtlcv.engine.closures import StepContext, after_step

    model.zero_grad(set_to_none=True)
    for p in b.parameters():
        p.grad = None
    torch.manual_seed(seed)
    logs = b.backward(losses_of(model, x, targets), model)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    # as the trainer: the closures the balancer needs (FAMO: the losses "after" the step)
    after_step(b, StepContext((x, targets), lambda batch: 0.9 * losses_of(model, *batch)))
    return logs, grads


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_survives_a_save_load_round_trip(name):
    torch.manual_seed(0)
    model = TinyHPS()
    x, targets = make_batch()
    b = balancing.create(name, num_tasks=3, **STATEFUL[name])
    opt = torch.optim.SGD(b.parameters(), lr=0.3) if list(b.parameters()) else None
    for step in range(3):
        run_step(b, model, x, [y * (1 + step) for y in targets], seed=step)
        if opt is not None:
            opt.step()
        b.on_epoch_end(step, [3.0 - step, 2.0, 1.0 + step], [0.2 + 0.1 * step, 0.6, 0.9])
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    restored = balancing.create(name, num_tasks=3, **STATEFUL[name])
    restored.load_state_dict(torch.load(buf))
    fresh = balancing.create(name, num_tasks=3, **STATEFUL[name])
    logs, grads = run_step(b, model, x, targets, seed=9)
    logs2, grads2 = run_step(restored, model, x, targets, seed=9)
    assert logs == logs2
    assert torch.equal(grads, grads2)
    # the state mattered: a fresh balancer would have done something else
    logs3, grads3 = run_step(fresh, model, x, targets, seed=9)
    assert logs3 != logs or not torch.equal(grads3, grads)


# ---------------------------------------------------------------- through the trainer
@pytest.mark.parametrize("name", ["mgda-ub", "dtp"])
def test_methods_train_through_the_trainer(small_cfg, tmp_path, name):
    from mtlcv.config import from_dict
    from mtlcv.engine.trainer import train

    cfg = copy.deepcopy(small_cfg)
    cfg["balancer"] = {"name": name}
    cfg["train"].update(epochs=2, max_steps=2)
    results = train(from_dict(cfg), tmp_path / "run", log=lambda s: None)
    for metrics in results["test"].values():
        assert all(np.isfinite(v) for v in metrics.values())
