"""Every balancer combines with every architecture: one real training step each."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlcv import balancing
from mtlcv.models.build import build_model
from mtlcv.registry import ARCHS, BALANCERS, TASKS

TASK_NAMES = ("semseg", "depth", "normals")


@pytest.fixture(scope="module")
def batch():
    from mtlcv.data.scenes import render

    r = render(2, size=(32, 48), seed=3)
    return {
        "image": torch.as_tensor(r["image"]).float() / 255,
        "semseg": torch.as_tensor(r["semseg"]).long(),
        "depth": torch.as_tensor(r["depth"]).float(),
        "normals": torch.as_tensor(r["normals"]).float(),
    }


_MODELS: dict[str, tuple[torch.nn.Module, dict]] = {}


def shared_model(arch: str, tasks: dict) -> torch.nn.Module:
    """One model per architecture for the whole module, restored to its initial state (weights,
    buffers, step counters) before every case: building 13 architectures 29 times over would
    double the module's time."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        model = build_model(arch, tasks, {"name": "tiny", "width": 8}, {"name": "light"})
        _MODELS[arch] = (model, copy.deepcopy(model.state_dict()))
    model, state = _MODELS[arch]
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    model.train()
    return model


@pytest.mark.parametrize("arch", ARCHS.names())
@pytest.mark.parametrize("method", BALANCERS.names())
def test_one_step_of_every_method_on_every_architecture(arch, method, batch):
    tasks = {t: TASKS.create(t) for t in TASK_NAMES}
    for t in TASK_NAMES:
        tasks[t].check_target(batch[t], batch["image"])
    model = shared_model(arch, tasks)
    torch.manual_seed(0)
    bal = balancing.create(method, num_tasks=len(tasks))
    params = list(model.parameters()) + list(bal.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    preds = model(batch["image"])
    aux = model.deep_supervision()
    losses = torch.stack(
        [
            tasks[t].loss(preds[t], batch[t])
            + sum(w * tasks[t].loss(p, batch[t]) for w, p in aux.get(t, ()))
            for t in TASK_NAMES
        ]
    )
    opt.zero_grad(set_to_none=True)
    bal.backward(losses, model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert moved > 0.5 * len(before), f"only {moved} of {len(before)} tensors were updated"


def test_rep_mode_on_a_model_without_separable_representation_warns(batch):
    tasks = {t: TASKS.create(t) for t in TASK_NAMES}
    model = build_model("mtan", tasks, {"name": "tiny", "width": 8}, {"name": "light"})
    bal = balancing.create("mgda-ub", num_tasks=3)
    from mtlcv.balancing import jacobian

    jacobian._warned_models.clear()  # warned once per process: earlier tests may have
    preds = model(batch["image"])
    losses = torch.stack([tasks[t].loss(preds[t], batch[t]) for t in TASK_NAMES])
    with pytest.warns(RuntimeWarning, match="no separable shared representation"):
        bal.backward(losses, model)


@pytest.mark.parametrize("arch", ARCHS.names())
def test_autol_meta_step_on_every_architecture(arch, batch):
    """Auto-λ's meta step (virtual step, held-out pass, finite difference) through the step
    contract on every architecture: λ moves, the model's parameters and buffers are bitwise as
    before, and the network's gradient is that of Σ λ_t L_t with the new λ."""
    from mtlcv.engine.closures import StepContext, before_backward

    tasks = {t: TASKS.create(t) for t in TASK_NAMES}
    model = shared_model(arch, tasks)

    def losses_of(b):
        preds = model(b["image"])
        aux = model.deep_supervision()
        return torch.stack([tasks[t].loss(preds[t], b[t])
                            + sum(w * tasks[t].loss(p, b[t]) for w, p in aux.get(t, ()))
                            for t in TASK_NAMES])

    held = {k: v.flip(0) for k, v in batch.items()}  # another batch: the images swapped
    bal = balancing.create("autol", num_tasks=3, lr=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(0)
    losses = losses_of(batch)
    state = copy.deepcopy(model.state_dict())
    before_backward(bal, StepContext(batch, losses_of, heldout=lambda: held, optimizer=opt))
    bal.backward(losses, model)
    assert not torch.equal(bal.meta_weights, torch.full((3,), 0.1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    got = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    (bal.meta_weights * losses_of(batch)).sum().backward()
    for g, p in zip(got, model.parameters()):
        if g is None or p.grad is None:
            assert g is None and p.grad is None
        else:
            torch.testing.assert_close(g, p.grad)
