"""Architectures from the literature: SPS, cross-stitch, MTAN, PAD-Net, MTI-Net, SegNet, complexity.

Besides forward/backward on every task set, each architecture is pinned to its paper by a
property that fails for a wrong implementation: cross-stitch with identity units *is* the
single-task networks, MTAN with masks of ones *is* hard sharing, SPS with no penalty *is* STL and
its penalty is the published distance, every deep-supervision loss reaches the backbone, and
the SegNets have the official parameter counts layer for layer.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlcv.config import load
from mtlcv.errors import ConfigError
from mtlcv.models import build_model
from mtlcv.models.archs.cross_stitch import CrossStitchUnit
from mtlcv.models.archs.padnet import Distillation
from mtlcv.models.complexity import count_flops, count_parameters, describe_arch
from mtlcv.registry import TASKS

TINY = {"name": "tiny", "width": 8}
SEGNET = {"name": "segnet", "width": 8}
HEAD = {"name": "light"}
ARCHS = ["sps", "cross_stitch", "mtan", "padnet", "mti_net"]
TASK_SETS = {
    2: ("semseg", "depth"),
    3: ("semseg", "depth", "normals"),
    4: ("semseg", "normals", "edges", "classification"),
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_tasks(names) -> dict:
    opts = {"semseg": {"num_classes": 13}, "classification": {"num_classes": 4}}
    return {n: TASKS.create(n, **opts.get(n, {})) for n in names}


@pytest.fixture(scope="module")
def scenes_batch() -> dict[str, torch.Tensor]:
    """Two rendered scenes at 32x48, in the batch contract."""
    from mtlcv.data.scenes import render

    a = {k: torch.from_numpy(v) for k, v in render(2, size=(32, 48), seed=1).items()}
    return {"image": a["image"].float() / 255, "semseg": a["semseg"].long(),
            "depth": a["depth"], "normals": a["normals"].float(), "edges": a["edges"].float(),
            "classification": a["classification"]}


def total_loss(model, tasks, out, batch) -> torch.Tensor:
    """The trainer's objective: each task's loss plus its weighted deep-supervision terms."""
    aux = model.deep_supervision()
    loss = 0
    for n, task in tasks.items():
        loss = loss + task.loss(out[n], batch[n])
        for w, pred in aux.get(n, ()):
            loss = loss + w * task.loss(pred, batch[n])
    return loss


def build(arch, names, backbone=TINY, seed=0, head=HEAD, **options):
    torch.manual_seed(seed)
    tasks = make_tasks(names)
    return build_model(arch, tasks, backbone, head, options), tasks


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # these networks are tiny: a second thread only adds synchronisation (and, on a shared
    # machine, spinning), so the module runs single-threaded and restores the setting after
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- every arch, every task set


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_every_task_set(arch, n, scenes_batch):
    model, tasks = build(arch, TASK_SETS[n])
    out = model(scenes_batch["image"])
    assert list(out) == list(tasks)
    for name, task in tasks.items():
        task.check_pred(out[name], scenes_batch[name])  # raises on a wrong shape
        for _, pred in model.deep_supervision().get(name, ()):
            assert pred.shape == out[name].shape
    total_loss(model, tasks, out, scenes_batch).backward()
    extra = model.extra_loss()
    if extra is not None:
        extra.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # every parameter is shared or belongs to exactly one task
    ids = [id(p) for p in model.shared_parameters()]
    for t in tasks:
        ids += [id(p) for p in model.task_parameters(t)]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backbone", [{"name": "resnet18"}, SEGNET], ids=["resnet18", "segnet"])
def test_resnet_and_segnet_backbones(arch, backbone):
    model, tasks = build(arch, ("semseg", "depth"), backbone)
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out["semseg"].shape == (2, 13, 32, 32) and out["depth"].shape == (2, 1, 32, 32)
    sum(o.square().mean() for o in out.values()).backward()
    bbs = [m for m in model.modules() if type(m).__name__ in ("ResNet", "SegNet")]
    assert bbs and all(p.grad is not None for bb in bbs for p in bb.parameters())


# ---------------------------------------------------------------- cross-stitch


def test_cross_stitch_initialisation_and_mixing():
    # the reference initialisation (Misra et al.; the survey code): 0.9 / 0.1 as given, for any T
    unit = CrossStitchUnit(3, 4, "scalar", 0.9, 0.1)
    want = np.full((3, 3), 0.1) + np.eye(3) * 0.8
    np.testing.assert_allclose(unit.alpha.detach().numpy(), want, rtol=1e-6)
    unit = CrossStitchUnit(3, 4, "scalar", 0.9, 0.1, normalize_init=True)
    np.testing.assert_allclose(unit.alpha.detach().numpy(), want / want.sum(1, keepdims=True))
    two = CrossStitchUnit(2, 4, "channel", 0.9, 0.1)
    np.testing.assert_allclose(two.alpha.detach()[:, :, 2].numpy(), [[0.9, 0.1], [0.1, 0.9]])
    with torch.no_grad():
        two.alpha.copy_(torch.rand(2, 2, 4))
    xs = [torch.randn(2, 4, 3, 5) for _ in range(2)]
    a, x = two.alpha.detach().numpy(), np.stack([t.numpy() for t in xs])
    want = np.einsum("ijc,jbchw->ibchw", a, x)
    for i, got in enumerate(two(xs)):
        np.testing.assert_allclose(got.detach().numpy(), want[i], rtol=1e-5, atol=1e-6)


def test_cross_stitch_units_train_at_their_own_learning_rate():
    """Misra et al. scale the units' learning rate by 10^2-10^3, the survey code by 100: the
    units form their own optimizer group at lr_scale x optim.lr (StepLR keeps the ratio)."""
    from mtlcv.balancing import create
    from mtlcv.config import from_dict
    from mtlcv.engine.experiment import build_optimizer, build_scheduler, optimizer_groups

    model, _ = build("cross_stitch", ("semseg", "depth"))
    cfg = from_dict({"optim": {"name": "sgd", "lr": 0.01, "weight_decay": 1e-4},
                     "schedule": {"name": "step", "step_size": 1, "gamma": 0.5}})
    opt = build_optimizer(cfg, optimizer_groups(model, create("fixed", num_tasks=2)))
    units = {id(p) for p in model.stitch.parameters()}
    assert [g["lr"] for g in opt.param_groups] == [0.01, 1.0]
    assert {id(p) for p in opt.param_groups[1]["params"]} == units
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    sched = build_scheduler(cfg, opt)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.5])
    model, _ = build("cross_stitch", ("semseg", "depth"), lr_scale=1)
    assert [g.get("lr_scale", 1) for g in model.parameter_groups()] == [1, 1]
    with pytest.raises(ConfigError, match="lr_scale"):
        build("cross_stitch", ("semseg", "depth"), lr_scale=0)


@pytest.mark.parametrize("mode", ["scalar", "channel"])
def test_cross_stitch_with_identity_units_equals_single_task_networks(mode, tmp_path, scenes_batch):
    names = ("semseg", "depth", "normals")
    stl, tasks = build("stl", names, seed=1)
    # one source as a trainer checkpoint file, the others as in-memory state dicts
    torch.save({"epoch": 1, "model": stl.state_dict()}, tmp_path / "best.pt")
    init = {"semseg": str(tmp_path / "best.pt"), "depth": stl.state_dict(),
            "normals": {k[len("nets.normals."):]: v for k, v in stl.state_dict().items()
                        if k.startswith("nets.normals.")}}
    cs, _ = build("cross_stitch", names, seed=2, mode=mode, alpha_self=1.0, alpha_other=0.0,
                  init_from=init)
    x = scenes_batch["image"]
    a, b = stl(x), cs(x)
    for t in names:
        assert torch.equal(a[t], b[t])
    total_loss(stl, tasks, a, scenes_batch).backward()
    total_loss(cs, tasks, b, scenes_batch).backward()
    for t in names:
        for (n, p), q in zip(stl.nets[t].named_parameters(), cs.nets[t].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=n)
    # and the default units do mix: the outputs then differ
    mixed, _ = build("cross_stitch", names, seed=2, init_from=init)
    assert not torch.allclose(mixed(x)["depth"], a["depth"])


def test_cross_stitch_init_from_errors(tmp_path):
    with pytest.raises(ConfigError, match="init_from.semseg"):
        build("cross_stitch", ("semseg", "depth"), init_from={"semseg": str(tmp_path / "no.pt")})
    with pytest.raises(ConfigError, match="not a task"):
        build("cross_stitch", ("semseg", "depth"), init_from={"edges": {}})
    other, _ = build("stl", ("normals",))
    with pytest.raises(ConfigError, match="no network for task 'semseg'"):
        build("cross_stitch", ("semseg", "depth"), init_from={"semseg": other.state_dict()})
    wide, _ = build("stl", ("semseg",), backbone={"name": "tiny", "width": 16})
    with pytest.raises(ConfigError, match="does not match"):
        build("cross_stitch", ("semseg", "depth"), init_from={"semseg": wide.state_dict()})


# ---------------------------------------------------------------- MTAN


@pytest.mark.parametrize("backbone", [TINY, SEGNET, {"name": "resnet18"}],
                         ids=["tiny", "segnet", "resnet18"])
def test_mtan_with_masks_of_ones_equals_hard_sharing(backbone):
    """Masks fixed to 1: outputs bitwise equal to HPS with the same backbone and head weights,
    and the backbone and head gradients equal (attention modules get none)."""
    names = ("semseg", "depth", "normals")
    hps, tasks = build("hps", names, backbone, seed=1)
    mtan, _ = build("mtan", names, backbone, seed=2)
    mtan.backbone.load_state_dict(hps.backbone.state_dict())
    mtan.heads.load_state_dict(hps.heads.state_dict())
    x = torch.rand(2, 3, 32, 32)
    free = mtan(x)["depth"]  # learned masks change the output ...
    assert not torch.allclose(free, hps(x)["depth"])
    mtan.set_fixed_masks(True)
    a, b = hps(x), mtan(x)
    for t in names:
        assert torch.equal(a[t], b[t])  # ... masks of ones give hard sharing exactly
    sum(o.square().mean() for o in a.values()).backward()
    sum(o.square().mean() for o in b.values()).backward()
    for (n, p), q in zip(hps.backbone.named_parameters(), mtan.backbone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    for p, q in zip(hps.heads.parameters(), mtan.heads.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in mtan.attention.parameters())


def test_mtan_masks_are_soft_attention():
    model, _ = build("mtan", ("semseg", "depth"))
    masks = []
    hooks = [m.register_forward_hook(lambda mod, i, o: masks.append(o)) for m in
             model.modules() if type(m).__name__ == "AttentionMask"]
    model(torch.rand(2, 3, 32, 32))
    assert len(masks) == 2 * model.backbone.num_stages
    assert all(((m > 0) & (m < 1)).all() for m in masks)
    for h in hooks:
        h.remove()


def test_mtan_attention_params_option_decides_what_balancers_share_and_clip():
    """``attention_params: shared`` (Nash-MTL's / FAMO's code): the masks join the shared
    parameters, so Nash-MTL's clip bounds backbone + carry + masks together and every mask gets
    the aggregated update; ``task`` (CAGrad's code, the default): each mask is its task's own
    parameter, outside the clip."""
    from mtlcv import balancing
    from mtlcv.balancing.jacobian import split_parameters

    names = ("semseg", "depth")
    x = torch.rand(2, 3, 16, 16)
    grads = {}
    for mode in ("task", "shared"):
        model, tasks = build("mtan", names, seed=4, attention_params=mode)
        shared, own = split_parameters(model)
        masks = {id(p) for p in model.attention.parameters()}
        assert (masks <= {id(p) for p in shared}) == (mode == "shared")
        first_masks = {id(p) for p in model.attention[names[0]].parameters()}
        assert (first_masks <= {id(p) for p in own[0]}) == (mode == "task")
        out = model(x)
        losses = torch.stack([out[t].square().mean() + 1.0 for t in names])
        balancing.create("nashmtl", num_tasks=2, max_norm=1e-3).backward(losses, model)
        sq = sum(float(p.grad.double().square().sum()) for p in shared if p.grad is not None)
        assert sq ** 0.5 == pytest.approx(1e-3, rel=1e-4)  # the clip covers exactly `shared`
        grads[mode] = torch.cat([p.grad.flatten() for p in model.attention.parameters()])
    # unclipped (task) mask gradients are far larger than the clipped (shared) ones
    assert grads["shared"].norm() <= 1e-3 * (1 + 1e-4) < grads["task"].norm()
    with pytest.raises(ConfigError, match="attention_params"):
        build("mtan", names, attention_params="heads")


def _conv(cin, cout, k=3):  # conv with bias
    return cin * cout * k * k + cout


def _layer(cin, cout):  # mtan's conv_layer: conv3x3 + BN
    return _conv(cin, cout) + 2 * cout


def _pred(c):  # mtan's conv_layer(pred=True): conv3x3 (64 -> 64) + conv1x1 (64 -> c)
    return _conv(64, 64) + _conv(64, c, 1)


def segnet_official_count() -> int:
    """Parameters of lorenmt/mtan's SegNet trunk (``encoder_block``, ``decoder_block``,
    ``conv_block_enc``, ``conv_block_dec`` of ``model_segnet_single.py``), from its layer list."""
    f = [64, 128, 256, 512, 512]
    n = _layer(3, f[0]) + _layer(f[0], f[0]) + 2 * _layer(f[0], f[0])  # encoder/decoder block 0
    for i in range(4):
        n += _layer(f[i], f[i + 1]) + _layer(f[i + 1], f[i])
        n += (1 if i == 0 else 2) * (_layer(f[i + 1], f[i + 1]) + _layer(f[i], f[i]))
    return n


def segnet_mtan_official_count(outputs=(13, 1, 3)) -> int:
    """Parameters of the official SegNet-MTAN (``model_segnet_mtan.SegNet``) from its layer list:
    the trunk, the shared ``encoder_block_att``/``decoder_block_att`` blocks, per task the
    ``encoder_att``/``decoder_att`` masks, and the prediction layers. Without mtan's 3-element
    ``logsigma`` (the uncertainty-weighting parameters, which mtlcv keeps in its balancer)."""
    f = [64, 128, 256, 512, 512]

    def att(cin, mid, cout):  # att_layer: conv1x1 + BN + conv1x1 + BN
        return _conv(cin, mid, 1) + 2 * mid + _conv(mid, cout, 1) + 2 * cout

    n = segnet_official_count()
    per_task = att(f[0], f[0], f[0]) + att(2 * f[0], f[0], f[0])
    per_task += sum(att(2 * f[i + 1], f[i + 1], f[i + 1]) + att(f[i + 1] + f[i], f[i], f[i])
                    for i in range(4))
    n += len(outputs) * per_task
    n += _layer(f[0], f[1]) + _layer(f[0], f[0])
    n += sum(_layer(f[i + 1], f[i + 2]) + _layer(f[i + 1], f[i]) for i in range(3))
    n += 2 * _layer(f[4], f[4])
    return n + sum(_pred(c) for c in outputs)


def test_segnets_have_the_official_parameter_counts():
    """Layer for layer with lorenmt/mtan's NYUv2 models, with the ``mtan`` head. The official
    scripts print ``count_parameters`` (every trainable parameter); mtan's and CAGrad's
    multi-task files also declare ``logsigma`` (3 parameters, used only by uncertainty weighting;
    mtlcv's ``uncertainty`` balancer holds them), Nash-MTL's and FAMO's ``SegNetMtan`` does not.
    Instantiating the official classes gives: SegNet-MTAN 44,229,073 (Nash-MTL/FAMO) and
    44,229,076 (mtan/CAGrad, + logsigma); split ("standard") 25,055,188 (+ logsigma); single-task
    SegNet 24,981,069 (semantic, the paper's reference), 24,980,289 (depth), 24,980,419
    (normal). The layer lists below reproduce them by hand."""
    official = segnet_mtan_official_count()
    assert official == 44_229_073  # Nash-MTL's / FAMO's SegNetMtan
    assert round(official / 24_981_069, 2) == 1.77  # the MTAN paper: 1.77 x one SegNet
    tasks3 = ("semseg", "depth", "normals")
    mtan, _ = build("mtan", tasks3, {"name": "segnet"}, head={"name": "mtan"})
    assert count_parameters(mtan) == official
    single = {"semseg": 13, "depth": 1, "normals": 3}
    want = {"semseg": 24_981_069, "depth": 24_980_289, "normals": 24_980_419}
    for t, c in single.items():
        assert segnet_official_count() + _pred(c) == want[t]
        stl, _ = build("stl", (t,), {"name": "segnet"}, head={"name": "mtan"})
        assert count_parameters(stl) == want[t], t
    stl, _ = build("stl", tasks3, {"name": "segnet"}, head={"name": "mtan"})
    assert count_parameters(stl) == sum(want.values())
    split = segnet_official_count() + sum(_pred(c) for c in single.values())
    assert split + 3 == 25_055_188  # mtan's model_segnet_split.py ("standard") with logsigma
    hps, _ = build("hps", tasks3, {"name": "segnet"}, head={"name": "mtan"})
    assert count_parameters(hps) == split


def test_mtan_head_and_segnet_input_are_mtans():
    from mtlcv.models.build import build_backbone
    from mtlcv.registry import HEADS

    head = HEADS.create("mtan", in_channels=8, out_channels=3)
    assert [type(m) for m in head] == [torch.nn.Conv2d, torch.nn.Conv2d]  # no BN, no ReLU
    assert head[0].kernel_size == (3, 3) and head[1].kernel_size == (1, 1)
    assert all(not m.bias.detach().any() for m in head)
    x = torch.rand(1, 3, 32, 32)
    # mtan feeds [0, 1] images to its SegNet: no ImageNet standardisation unless asked for
    plain = build_backbone({"name": "segnet", "width": 4})
    std = build_backbone({"name": "segnet", "width": 4, "standardize": True})
    std.load_state_dict(plain.state_dict())
    plain.eval(), std.eval()
    first = plain.forward_stage(x, 0)
    torch.testing.assert_close(first, plain.stages[0](x))
    from mtlcv.models.base import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    sd = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(std.forward_stage(x, 0), plain.stages[0]((x - mean) / sd))


# ---------------------------------------------------------------- soft parameter sharing


def sgd_steps(model, tasks, batch, steps, lr=0.05, optim=torch.optim.SGD):
    opt = optim(model.parameters(), lr=lr)
    for _ in range(steps):
        out = model(batch["image"])
        opt.zero_grad()
        total_loss(model, tasks, out, batch).backward()
        extra = model.extra_loss()
        if extra is not None:
            extra.backward()
        opt.step()


def test_sps_without_penalty_equals_stl(scenes_batch):
    names = ("semseg", "depth", "normals")
    stl, tasks = build("stl", names, seed=3)
    sps, _ = build("sps", names, seed=3, penalty=0.0)
    assert sps.extra_loss() is None and list(sps.shared_parameters()) == []
    for p, q in zip(stl.parameters(), sps.parameters()):
        assert torch.equal(p, q)  # same construction order: same initial weights
    sgd_steps(stl, tasks, scenes_batch, 2, lr=1e-3, optim=torch.optim.Adam)
    sgd_steps(sps, tasks, scenes_batch, 2, lr=1e-3, optim=torch.optim.Adam)
    for p, q in zip(stl.parameters(), sps.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("norm", ["l2", "trace"])
def test_sps_penalty_is_the_published_distance(norm):
    model, _ = build("sps", ("semseg", "depth", "normals"), penalty=0.5, norm=norm)
    nets = [[p.detach().numpy().ravel() for p in model.nets[t].backbone.parameters()]
            for t in model.tasks]
    want = 0.0
    for group in zip(*nets):
        if norm == "l2":
            want += sum(np.sum((a - b) ** 2) for a, b in itertools.combinations(group, 2))
        else:
            want += np.linalg.svd(np.stack(group).astype(np.float64), compute_uv=False).sum()
    got = model.extra_loss()
    assert got.requires_grad
    assert math.isclose(got.item(), 0.5 * want, rel_tol=1e-4)


@pytest.mark.parametrize("norm", ["l2", "trace"])
def test_sps_large_penalty_pulls_task_parameters_together(norm, scenes_batch):
    names = ("semseg", "depth")
    free, tasks = build("sps", names, seed=4, penalty=0.0, norm=norm)
    tied, _ = build("sps", names, seed=4, penalty=1.0 if norm == "l2" else 10.0, norm=norm)
    start = tied.distance().item()
    sgd_steps(free, tasks, scenes_batch, 4)
    sgd_steps(tied, tasks, scenes_batch, 4)
    assert tied.distance().item() < 0.9 * start
    assert tied.distance().item() < 0.9 * free.distance().item()


# ---------------------------------------------------------------- PAD-Net and MTI-Net


def backbone_reached(model, loss) -> bool:
    grads = torch.autograd.grad(loss, list(model.backbone.parameters()), retain_graph=True,
                                allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["a", "b", "c"])
def test_padnet_every_deep_supervision_loss_reaches_the_backbone(kind, scenes_batch):
    names = ("semseg", "depth", "normals", "edges")
    model, tasks = build("padnet", names, distillation=kind, final_tasks=["semseg", "depth"])
    out = model(scenes_batch["image"])
    aux = model.deep_supervision()
    assert sorted(aux) == ["depth", "semseg"]  # auxiliary tasks have no final prediction...
    for t in ("normals", "edges"):  # ... their output is the intermediate prediction
        torch.testing.assert_close(
            out[t], model.intermediate[t](model.branches[t](model.representation), (32, 48))
        )
    for t, preds in aux.items():
        assert len(preds) == 1 and preds[0][0] == 1.0
        assert backbone_reached(model, tasks[t].loss(preds[0][1], scenes_batch[t]))
    for t in ("normals", "edges"):
        assert backbone_reached(model, tasks[t].loss(out[t], scenes_batch[t]))


def test_padnet_distillation_modules_compute_the_papers_equations():
    torch.manual_seed(0)
    C, T, k = 4, 3, 1
    feats = [torch.randn(2, C, 5, 6) for _ in range(T)]
    b, c = Distillation("b", C, T, k), Distillation("c", C, T, k)
    want_b = feats[k] + sum(F.conv2d(feats[l], b.message[l].weight, padding=1)
                            for l in range(T) if l != k)
    gate = torch.sigmoid(F.conv2d(feats[k], c.gate[0].weight, padding=1))  # from task k itself
    want_c = feats[k] + sum(gate * F.conv2d(feats[l], c.message[l].weight, padding=1)
                            for l in range(T) if l != k)
    torch.testing.assert_close(b(feats), want_b)
    torch.testing.assert_close(c(feats), want_c)
    a = Distillation("a", C, T, k).eval()
    torch.testing.assert_close(a(feats), a.fuse(torch.cat(feats, 1)))


def test_mti_net_deep_supervision_at_every_scale_reaches_the_backbone(scenes_batch):
    names = ("semseg", "depth", "edges")
    model, tasks = build("mti_net", names, final_tasks=["semseg", "depth"])
    out = model(scenes_batch["image"])
    aux = model.deep_supervision()
    assert [len(aux[t]) for t in names] == [4, 4, 3]  # 4 scales; edges' finest is its output
    for t in names:
        for _, pred in aux[t]:
            assert pred.shape == out[t].shape
            assert backbone_reached(model, tasks[t].loss(pred, scenes_batch[t]))


def test_mti_net_needs_enough_stages():
    with pytest.raises(ConfigError, match="scales"):
        build("mti_net", ("semseg", "depth"), scales=5)  # tiny has 4 stages


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_fits_two_scenes(arch, scenes_batch):
    names = ("semseg", "depth")
    model, tasks = build(arch, names)
    seg, depth = scenes_batch["semseg"], scenes_batch["depth"]
    majority = torch.bincount(seg.flatten()).max().item() / seg.numel()
    with torch.no_grad():
        before = tasks["depth"].loss(model(scenes_batch["image"])["depth"], depth).item()
    sgd_steps(model, tasks, scenes_batch, 30, lr=1e-2, optim=torch.optim.Adam)
    with torch.no_grad():
        out = model(scenes_batch["image"])
    acc = (out["semseg"].argmax(1) == seg).float().mean().item()
    assert acc > majority + 0.25, (acc, majority)
    assert tasks["depth"].loss(out["depth"], depth).item() < before / 4


# ---------------------------------------------------------------- complexity and configs


def test_flops_count_multiply_accumulates():
    nn = torch.nn
    convs = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2))
    assert count_flops(convs, (10, 12)) == 6 * 10 * 12 * 3 + 8 * 5 * 6 * (6 // 2) * 9
    assert count_flops(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 7)), (4, 5)) == 60 * 7
    from mtlcv.models import build_backbone

    resnet = build_backbone({"name": "resnet18"})
    assert abs(count_flops(resnet, (224, 224)) / 1e9 - 1.8) < 0.05  # He et al. 2016, Table 1
    assert count_parameters(resnet) == 11_689_512 - (512 * 1000 + 1000)  # torchvision minus fc


def test_describe_arch():
    text = describe_arch("mtan", size=(32, 48), tasks=("semseg", "depth"), backbone="tiny")
    assert "M params" in text and "GFLOPs at 32x48" in text
    assert describe_arch("nope").startswith("n/a")


@pytest.mark.parametrize(
    "arch, options, match",
    [
        ("sps", {"norm": "l1"}, "norm"),
        ("sps", {"penalty": -1}, "penalty"),
        ("cross_stitch", {"mode": "pixel"}, "mode"),
        ("cross_stitch", {"alpha_self": 0, "alpha_other": 0}, "alpha"),
        ("mtan", {"reduction": 0}, "reduction"),
        ("padnet", {"distillation": "d"}, "distillation"),
        ("padnet", {"final_tasks": ["edges"]}, "final_tasks"),
        ("mti_net", {"aggregation": "sum"}, "aggregation"),
        ("mti_net", {"aux_weight": -1}, "aux_weight"),
        ("mtan", {"lambda": 1}, "no option 'lambda'"),
    ],
)
def test_bad_options_are_config_errors(arch, options, match):
    with pytest.raises(ConfigError, match=match):
        build(arch, ("semseg", "depth"), **options)


CONFIG_FILES = ["scenes/sps.yaml", "scenes/cross_stitch.yaml", "scenes/mtan.yaml",
                "scenes/padnet.yaml", "scenes/mti_net.yaml", "nyuv2/segnet_mtan.yaml",
                "nyuv2/hps_vs_sps_segnet.yaml", "scenes/detection.yaml",
                "scenes/lenet_objects.yaml"]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_configs_validate_and_build(name):
    cfg = load(CONFIGS / name)
    backbone = dict(cfg.model.backbone)
    if backbone["name"] == "segnet":
        backbone["width"] = 8  # the same options on a small network
    tasks = make_tasks(cfg.tasks)
    model = build_model(cfg.model.arch, tasks, backbone, cfg.model.head, cfg.model.options)
    assert list(model(torch.rand(1, 3, 32, 32))) == cfg.tasks
