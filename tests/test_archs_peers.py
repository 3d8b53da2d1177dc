"""The architectures of LibMTL and the survey code besides the classic ones: MMoE, CGC, PLE,
DSelect-k, Learning-to-Branch, NDDR-CNN. Each is pinned to its paper by a property a wrong
implementation fails: a one-expert MMoE and a one-expert PLE *are* hard sharing, CGC without
task experts *is* MMoE, DSelect-k's gate selects at most k experts once its binary variables
saturate, an LTB whose every node keeps its own parent *is* the single-task networks, NDDR's
layer is its equation; and every parameter a model gives to one task gets no gradient from the
other tasks' losses."""

from __future__ import annotations

import pytest
import torch

from mtlcv.errors import ConfigError
from mtlcv.models import build_model
from mtlcv.models.archs.dselect_k import smooth_step
from mtlcv.models.archs.nddr_cnn import NDDRLayer
from mtlcv.registry import TASKS

TINY = {"name": "tiny", "width": 4}
HEAD = {"name": "light"}
NEW = ["mmoe", "cgc", "ple", "dselect_k", "ltb", "nddr_cnn"]
SETS = {2: ("semseg", "depth"), 4: ("semseg", "normals", "edges", "classification")}


def make_tasks(names):
    opts = {"semseg": {"num_classes": 13}, "classification": {"num_classes": 4}}
    return {n: TASKS.create(n, **opts.get(n, {})) for n in names}


def build(arch, names, backbone=TINY, seed=0, **options):
    torch.manual_seed(seed)
    tasks = make_tasks(names)
    return build_model(arch, tasks, backbone, HEAD, options), tasks


@pytest.fixture(scope="module")
def batch():
    from mtlcv.data.scenes import render

    a = {k: torch.from_numpy(v) for k, v in render(2, size=(32, 48), seed=2).items()}
    return {"image": a["image"].float() / 255, "semseg": a["semseg"].long(), "depth": a["depth"],
            "normals": a["normals"].float(), "edges": a["edges"].float(),
            "classification": a["classification"]}


def losses(model, tasks, out, batch):
    return {n: t.loss(out[n], batch[n]) for n, t in tasks.items()}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("arch", NEW)
def test_forward_backward_and_parameter_ownership(arch, n, batch):
    # (LTB's branching logits get gradients once its warm-up is over)
    model, tasks = build(arch, SETS[n], **({"warmup_steps": 0} if arch == "ltb" else {}))
    out = model(batch["image"])
    assert list(out) == list(tasks)
    for name, task in tasks.items():
        task.check_pred(out[name], batch[name])
    L = losses(model, tasks, out, batch)
    # every parameter is shared or belongs to exactly one task ...
    ids = [id(p) for p in model.shared_parameters()]
    for t in tasks:
        ids += [id(p) for p in model.task_parameters(t)]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # ... and a task's own parameters get no gradient from any other task's loss
    for t in tasks:
        own = list(model.task_parameters(t))
        assert own
        others = sum(v for s, v in L.items() if s != t)
        grads = torch.autograd.grad(others, own, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads), t
    sum(L.values()).backward()
    extra = model.extra_loss()
    if extra is not None:
        extra.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("arch", NEW)
def test_resnet_and_segnet_backbones(arch):
    for bb in ({"name": "resnet18"}, {"name": "segnet", "width": 4}):
        model, _ = build(arch, ("semseg", "depth"), bb, num_experts=2) if arch in (
            "mmoe", "dselect_k") else build(arch, ("semseg", "depth"), bb)
        out = model(torch.rand(2, 3, 32, 32))
        assert out["semseg"].shape == (2, 13, 32, 32) and out["depth"].shape == (2, 1, 32, 32)


def copy_into_hps(model, backbone, hps):
    hps.backbone.load_state_dict(backbone.state_dict())
    hps.heads.load_state_dict(model.heads.state_dict())


def test_one_expert_mmoe_and_ple_are_hard_sharing(batch):
    names = ("semseg", "depth", "normals")
    hps, _ = build("hps", names, seed=1)
    x = batch["image"]
    mmoe, _ = build("mmoe", names, seed=2, num_experts=1)
    copy_into_hps(mmoe, mmoe.experts[0], hps)
    ple, _ = build("ple", names, seed=3, num_shared=1, num_specific=0)
    a, b = mmoe(x), hps(x)
    for t in names:
        torch.testing.assert_close(a[t], b[t])
    copy_into_hps(ple, ple.shared[0], hps)
    a, b = ple(x), hps(x)
    for t in names:
        torch.testing.assert_close(a[t], b[t])
    # with several experts the gates do mix: each sample's weights are a distribution
    mmoe3, _ = build("mmoe", names, num_experts=3)
    for w in mmoe3.gate_weights(x).values():
        assert w.shape == (2, 3) and (w > 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(2))


def test_cgc_without_task_experts_is_mmoe(batch):
    names = ("semseg", "depth")
    cgc, _ = build("cgc", names, seed=1, num_shared=2, num_specific=0)
    mmoe, _ = build("mmoe", names, seed=2, num_experts=2)
    mmoe.experts.load_state_dict(cgc.shared.state_dict())
    mmoe.gates.load_state_dict(cgc.gates.state_dict())
    mmoe.heads.load_state_dict(cgc.heads.state_dict())
    a, b = cgc(batch["image"]), mmoe(batch["image"])
    for t in names:
        torch.testing.assert_close(a[t], b[t])


def test_ple_shared_gate_mixes_every_expert(batch):
    model, tasks = build("ple", ("semseg", "depth", "normals"), num_shared=2, num_specific=1)
    # T * specific + shared experts feed the shared gate of every stage but the last
    assert [g.linear.out_features for g in model.shared_gates] == [3 + 2] * (model.num_stages - 1)
    assert all(g.linear.out_features == 1 + 2 for gs in model.task_gates.values() for g in gs)
    # a task's first-stage expert reaches the other tasks' outputs (through the shared gate)
    out = model(batch["image"])
    p = next(model.specific["semseg"][0].parameters())
    (g,) = torch.autograd.grad(tasks["depth"].loss(out["depth"], batch["depth"]), p)
    assert g.abs().sum() > 0


def test_dselect_k_smooth_step_and_sparse_selection(batch):
    g = 1.0
    t = torch.linspace(-1, 1, 2001, requires_grad=True)
    s = smooth_step(t, g)
    assert float(smooth_step(torch.tensor(0.0), g)) == 0.5
    assert (s[t <= -0.5] == 0).all() and (s[t >= 0.5] == 1).all()
    (ds,) = torch.autograd.grad(s.sum(), t)
    assert ds.max() <= 1.5 / g + 1e-5 and float(ds[0]) == 0 and float(ds[-1]) == 0  # C1 at ends
    model, _ = build("dselect_k", ("semseg", "depth"), num_experts=4, num_nonzeros=2)
    gate = model.gates["semseg"]
    x = batch["image"]
    w = gate(x)
    torch.testing.assert_close(w.sum(1), torch.ones(2))  # every selector is a distribution
    assert (w > 0).sum(1).min() > 2  # at initialisation every expert has weight
    with torch.no_grad():  # saturate the binary variables: each selector is one-hot
        gate.z.weight.zero_()
        gate.z.bias.copy_(torch.tensor([1.0, -1.0, -1.0, 1.0]))  # selectors pick experts 2 and 1
    w = gate(x)
    assert ((w > 0).sum(1) <= 2).all()
    assert torch.equal((w[0] > 0).nonzero().flatten(), torch.tensor([1, 2]))
    # the regulariser (entropy of the selectors) is zero for one-hot selectors
    assert float(gate.regulariser().detach()) == pytest.approx(0.0, abs=1e-5)
    odd, _ = build("dselect_k", ("semseg", "depth"), num_experts=3)
    odd(x)
    assert odd.extra_loss() is not None and torch.isfinite(odd.extra_loss())


def test_ltb_with_own_parents_is_single_task_networks(batch):
    names = ("semseg", "depth", "normals")
    stl, _ = build("stl", names, seed=1)
    ltb, _ = build("ltb", names, seed=2, warmup_steps=0)
    for i, t in enumerate(names):
        ltb.nodes[i].load_state_dict(stl.nets[t].backbone.state_dict())
        ltb.heads[t].load_state_dict(stl.nets[t].head.state_dict())
    with torch.no_grad():
        ltb.logits.copy_(torch.eye(3).expand_as(ltb.logits) * 50.0)
    x = batch["image"]
    ltb.eval()
    stl.eval()
    a, b = ltb(x), stl(x)
    for t in names:
        torch.testing.assert_close(a[t], b[t])
    assert ltb.branching() == [[0, 1, 2]] * (ltb.num_stages - 1)
    # training: hard one-hot samples, the step count drives the temperature
    ltb.train()
    before = ltb.temperature()
    ltb(x)
    assert int(ltb.steps) == 1 and ltb.temperature() < before
    a = ltb._choices()
    assert ((a == 0) | (a == 1)).all() and (a.sum(-1) == 1).all()
    warm, _ = build("ltb", names, warmup_steps=5)
    torch.testing.assert_close(warm._choices(), torch.full_like(warm.logits, 1 / 3))


def test_nddr_layer_is_its_equation_and_init_from_single_task(tmp_path):
    torch.manual_seed(0)
    layer = NDDRLayer(3, 4, 0.8, 0.05).eval()
    xs = [torch.randn(2, 4, 5, 6) for _ in range(3)]
    out = layer(xs)
    for t in range(3):
        z = 0.8 * xs[t] + 0.05 * sum(xs[s] for s in range(3) if s != t)  # diagonal init
        bn = layer.reduce[t][1]
        want = torch.relu((z - bn.running_mean[:, None, None]) /
                          torch.sqrt(bn.running_var[:, None, None] + bn.eps))
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-6)
    names = ("semseg", "depth")
    stl, _ = build("stl", names, seed=3)
    model, _ = build("nddr_cnn", names, seed=4, init_from={t: stl.state_dict() for t in names})
    for t in names:
        for p, q in zip(stl.nets[t].parameters(), model.nets[t].parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("arch,options,match", [
    ("mmoe", {"num_experts": 0}, "num_experts"), ("mmoe", {"gate_pool": [0, 2]}, "gate_pool"),
    ("cgc", {"num_shared": 0}, "num_shared"), ("ple", {"num_specific": -1}, "num_specific"),
    ("dselect_k", {"num_nonzeros": 5}, "num_nonzeros"), ("dselect_k", {"gamma": 0}, "gamma"),
    ("ltb", {"tau": 0}, "tau"), ("ltb", {"warmup_steps": -1}, "warmup_steps"),
    ("nddr_cnn", {"alpha": "x"}, "alpha"), ("nddr_cnn", {"init_from": {"edges": {}}}, "not a task"),
])
def test_bad_options_are_config_errors(arch, options, match):
    with pytest.raises(ConfigError, match=match):
        build(arch, ("semseg", "depth"), **options)


@pytest.mark.parametrize("arch", NEW)
def test_each_architecture_fits_two_scenes(arch, batch):
    opts = {"warmup_steps": 0} if arch == "ltb" else {}
    model, tasks = build(arch, ("semseg", "depth"), {"name": "tiny", "width": 8}, **opts)
    seg, depth = batch["semseg"], batch["depth"]
    majority = torch.bincount(seg.flatten()).max().item() / seg.numel()
    with torch.no_grad():
        before = tasks["depth"].loss(model(batch["image"])["depth"], depth).item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        out = model(batch["image"])
        opt.zero_grad()
        sum(losses(model, tasks, out, batch).values()).backward()
        extra = model.extra_loss()
        if extra is not None:
            extra.backward()
        opt.step()
    with torch.no_grad():
        out = model(batch["image"])
    acc = (out["semseg"].argmax(1) == seg).float().mean().item()
    assert acc > majority + 0.2, (acc, majority)
    assert tasks["depth"].loss(out["depth"], depth).item() < before / 3
