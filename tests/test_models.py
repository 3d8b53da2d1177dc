"""Backbones, heads, the stl/hps architectures and the model builder."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlcv.errors import ConfigError
from mtlcv.models import build_backbone, build_model
from mtlcv.models.base import IMAGENET_MEAN, IMAGENET_STD, MultiTaskModel
from mtlcv.models.heads import ASPP
from mtlcv.registry import HEADS

H, W = 64, 80
TINY = {"name": "tiny", "width": 8}


def task(name: str, channels: int, dense: bool = True) -> SimpleNamespace:
    return SimpleNamespace(name=name, channels=channels, dense=dense)


ALL_TASKS = [task("semseg", 5), task("cls", 4, dense=False), task("depth", 1)]


def tasks_of(n: int) -> dict[str, SimpleNamespace]:
    return {t.name: t for t in ALL_TASKS[:n]}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    "spec, channels, strides",
    [
        (TINY, [8, 16, 32, 32], [2, 4, 8, 8]),
        ({"name": "resnet18"}, [64, 64, 128, 256, 512], [4, 4, 8, 16, 32]),
        ({"name": "resnet18", "dilated": True}, [64, 64, 128, 256, 512], [4, 4, 8, 8, 8]),
        ({"name": "resnet34"}, [64, 64, 128, 256, 512], [4, 4, 8, 16, 32]),
        ({"name": "resnet50", "dilated": True}, [64, 256, 512, 1024, 2048], [4, 4, 8, 8, 8]),
    ],
)
def test_stages_match_declared_channels_and_strides(spec, channels, strides):
    bb = build_backbone(spec).eval()
    assert bb.stage_channels == channels and bb.stage_strides == strides
    assert bb.num_stages == len(channels) and bb.out_channels == channels[-1]
    x = torch.rand(1, 3, H, W)
    with torch.no_grad():
        feats = bb.forward_stages(x)
        assert torch.equal(feats[-1], bb(x))
    for f, c, s in zip(feats, channels, strides):
        assert tuple(f.shape) == (1, c, math.ceil(H / s), math.ceil(W / s))


def test_resnet_stem_normalises_then_conv_bn_relu_maxpool():
    bb = build_backbone({"name": "resnet18"}).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.from_numpy(np.array(IMAGENET_MEAN, np.float32)).view(1, 3, 1, 1)
    std = torch.from_numpy(np.array(IMAGENET_STD, np.float32)).view(1, 3, 1, 1)
    with torch.no_grad():
        want = F.max_pool2d(F.relu(bb.bn1(bb.conv1((x - mean) / std))), 3, 2, 1)
        torch.testing.assert_close(bb.forward_stage(x, 0), want)
        torch.testing.assert_close(bb.forward_stage(want, 1), bb.layer1(want))


def torchvision_resnet_keys(layers: list[int], bottleneck: bool) -> set[str]:
    """torchvision's ResNet state-dict keys without ``fc``, from the architecture's rules."""

    def bn(p: str) -> list[str]:
        return [
            f"{p}.{k}"
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ]

    keys = ["conv1.weight", *bn("bn1")]
    for i, n in enumerate(layers, start=1):
        for b in range(n):
            pre = f"layer{i}.{b}"
            for c in range(1, 4 if bottleneck else 3):
                keys += [f"{pre}.conv{c}.weight", *bn(f"{pre}.bn{c}")]
            # the first block projects its shortcut when it strides or changes width
            if b == 0 and (i > 1 or bottleneck):
                keys += [f"{pre}.downsample.0.weight", *bn(f"{pre}.downsample.1")]
    return set(keys)


@pytest.mark.parametrize(
    "name, layers, bottleneck, n_params",
    # torchvision's published parameter counts minus the 1000-way fc layer
    [
        ("resnet18", [2, 2, 2, 2], False, 11_689_512 - 513_000),
        ("resnet34", [3, 4, 6, 3], False, 21_797_672 - 513_000),
        ("resnet50", [3, 4, 6, 3], True, 25_557_032 - 2_049_000),
    ],
)
def test_resnet_keys_and_sizes_match_torchvision(name, layers, bottleneck, n_params):
    for dilated in (False, True):
        bb = build_backbone({"name": name, "dilated": dilated})
        sd = bb.state_dict()
        assert set(sd) == torchvision_resnet_keys(layers, bottleneck)
        assert len(sd) == len(set(sd))
        assert sum(p.numel() for p in bb.parameters()) == n_params
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    e = 4 if bottleneck else 1
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128 * e, 64 * e, 1, 1)


def test_dilation_follows_torchvision_rule():
    r18 = build_backbone({"name": "resnet18", "dilated": True})
    # the conv that used to stride keeps the previous dilation, the others take the new one
    assert r18.layer3[0].conv1.stride == (1, 1) and r18.layer3[0].conv1.dilation == (1, 1)
    assert r18.layer3[0].conv2.dilation == (2, 2) and r18.layer3[1].conv1.dilation == (2, 2)
    assert r18.layer4[0].conv1.dilation == (2, 2) and r18.layer4[1].conv2.dilation == (4, 4)
    assert r18.layer3[0].downsample[0].stride == (1, 1)
    r50 = build_backbone({"name": "resnet50", "dilated": True})
    assert r50.layer3[0].conv2.dilation == (1, 1) and r50.layer3[1].conv2.dilation == (2, 2)
    assert r50.layer4[0].conv2.dilation == (2, 2) and r50.layer4[2].conv2.dilation == (4, 4)
    plain = build_backbone({"name": "resnet18"})
    assert plain.layer4[1].conv2.dilation == (1, 1) and plain.layer4[0].conv1.stride == (2, 2)


# ------------------------------------------------------------------ weights


def _trained_resnet18() -> torch.nn.Module:
    src = build_backbone({"name": "resnet18"})
    with torch.no_grad():
        src(torch.rand(4, 3, 32, 32))  # move the BN running statistics off their init
    return src.eval()


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model_module", "no_batches_tracked"])
def test_resnet_weights_load_torchvision_style_file(tmp_path, layout):
    src = _trained_resnet18()
    sd = dict(src.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    if layout == "no_batches_tracked":  # torchvision's original 2017 checkpoints
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if layout == "model_module":
        sd = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": torch.tensor(3)}
    elif layout == "state_dict":
        sd = {"state_dict": sd}
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    dst = build_backbone({"name": "resnet18", "weights": str(path)}).eval()
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        assert not torch.equal(build_backbone({"name": "resnet18"}).eval()(x), src(x))
        assert torch.equal(dst(x), src(x))


def test_resnet_weights_mismatch_names_file_and_key(tmp_path):
    sd = dict(build_backbone({"name": "resnet18"}).state_dict())
    sd["layer2.1.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ConfigError, match=r"bad\.pth.*layer2\.1\.conv1\.weight.*\[128, 64, 3, 3\]"):
        build_backbone({"name": "resnet18", "weights": str(path)})
    # a resnet34 file has extra blocks; a resnet18 file misses them
    del sd["layer2.1.conv1.weight"]
    sd["layer1.2.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    torch.save(sd, path)
    with pytest.raises(ConfigError, match=r"missing keys layer2\.1\.conv1\.weight"):
        build_backbone({"name": "resnet18", "weights": str(path)})
    with pytest.raises(ConfigError, match=r"unexpected keys layer1\.2\.conv1\.weight"):
        build_backbone({"name": "resnet18", "weights": str(path)})


def test_resnet_weights_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.pth"):
        build_backbone({"name": "resnet18", "weights": str(tmp_path / "nope.pth")})
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth"):
        build_backbone({"name": "resnet50", "weights": str(junk)})
    torch.save([1, 2], junk)
    with pytest.raises(ConfigError, match="junk.pth.*not a state dict"):
        build_backbone({"name": "resnet18", "weights": str(junk)})


# -------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", ["light", "aspp"])
def test_heads_keep_resolution(name):
    head = HEADS.create(name, in_channels=32, out_channels=7).eval()
    assert head(torch.rand(2, 32, 9, 11)).shape == (2, 7, 9, 11)


def test_aspp_branches_and_rates():
    head = HEADS.create("aspp", in_channels=16, out_channels=3, channels=8)
    aspp = head[0]
    assert isinstance(aspp, ASPP) and len(aspp.branches) == 4  # 1x1 + three atrous 3x3
    assert [b[0].dilation for b in aspp.branches] == [(1, 1), (12, 12), (24, 24), (36, 36)]
    assert aspp.project[0].in_channels == 5 * 8  # plus the image-pooling branch
    # image pooling sees the whole image: changing one far pixel changes every output pixel
    aspp.eval()
    x = torch.rand(1, 16, 40, 40)
    y = x.clone()
    y[..., 0, 0] += 10
    with torch.no_grad():
        diff = (aspp(x) - aspp(y)).abs().sum(1)[0]
    assert (diff[20:, 20:] > 0).all()


def test_image_level_task_gets_pooled_linear_classifier():
    model = build_model("hps", {"cls": task("cls", 4, dense=False)}, TINY, {"name": "aspp"}).eval()
    x = torch.rand(3, 3, H, W)
    with torch.no_grad():
        feat = model.encode(x)
        fc = model.heads["cls"].net.fc
        want = feat.numpy().mean(axis=(2, 3)) @ fc.weight.numpy().T + fc.bias.numpy()
        np.testing.assert_allclose(model(x)["cls"].numpy(), want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- architectures

CASES = [
    (arch, bb, n)
    for arch in ("hps", "stl")
    for bb in (TINY, {"name": "resnet18", "dilated": True})
    for n in (1, 2, 3)
] + [("hps", {"name": "resnet50", "dilated": True}, 3), ("stl", {"name": "resnet50"}, 2)]


def _id(v: object) -> str:
    return v["name"] if isinstance(v, dict) else str(v)


@pytest.mark.parametrize("arch, bb, n", CASES, ids=_id)
def test_forward_backward_shapes(arch, bb, n):
    tasks = tasks_of(n)
    model = build_model(arch, tasks, bb, {"name": "light", "mid_channels": 16})
    assert isinstance(model, MultiTaskModel) and model.tasks == list(tasks)
    out = model(torch.rand(2, 3, H, W))
    assert list(out) == list(tasks)
    for name, t in tasks.items():
        want = (2, t.channels, H, W) if t.dense else (2, t.channels)
        assert tuple(out[name].shape) == want
    sum(o.square().mean() for o in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", ["hps", "stl"])
def test_parameter_partition(arch):
    model = build_model(arch, tasks_of(3), TINY, {"name": "light"})
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in model.task_parameters(t)} for t in model.tasks]
    union = set(shared).union(*per_task)
    assert union == {id(p) for p in model.parameters()}
    assert sum(map(len, per_task)) + len(shared) == len(union)  # pairwise disjoint
    assert all(per_task)
    assert bool(shared) == (arch == "hps") == model.has_representation


@pytest.mark.parametrize("arch", ["hps", "stl"])
def test_loss_of_one_task_leaves_other_tasks_untouched(arch):
    model = build_model(arch, tasks_of(3), TINY, {"name": "light"})
    model(torch.rand(2, 3, H, W))["semseg"].square().mean().backward()
    for t in ("cls", "depth"):
        assert all(p.grad is None or not p.grad.any() for p in model.task_parameters(t))
    assert all(p.grad is not None and p.grad.any() for p in model.task_parameters("semseg"))
    assert all(p.grad is not None for p in model.shared_parameters())


def test_stl_joint_training_equals_separate_training():
    """Nothing couples the single-task networks: summed-loss training == training one alone."""
    tasks = tasks_of(3)
    joint = build_model("stl", tasks, TINY, {"name": "light"})
    alone = build_model("stl", {"depth": tasks["depth"]}, TINY, {"name": "light"})
    alone.nets["depth"].load_state_dict(joint.nets["depth"].state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (joint, alone)]
    for _ in range(3):
        x = torch.rand(4, 3, H, W)
        target = torch.rand(4, 1, H, W)
        for m, opt in zip((joint, alone), opts):
            opt.zero_grad()
            out = m(x)
            loss = sum(o.square().mean() for k, o in out.items() if k != "depth")
            (loss + (out["depth"] - target).square().mean()).backward()
            opt.step()
    for (k, a), b in zip(joint.nets["depth"].state_dict().items(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("head", ["light", "aspp"])
def test_hps_encode_decode_equals_forward(head):
    model = build_model(
        "hps",
        tasks_of(3),
        TINY,
        {"name": head, "channels": 8} if head == "aspp" else {"name": head},
    ).eval()
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        rep = model.encode(x)
        assert tuple(rep.shape) == (2, 32, H // 8, W // 8)
        split, whole = model.decode(rep, x.shape[-2:]), model(x)
    assert list(split) == list(whole)
    for k in whole:
        assert torch.equal(split[k], whole[k])


def test_stl_has_no_representation():
    model = build_model("stl", tasks_of(1), TINY, {"name": "light"})
    with pytest.raises(NotImplementedError):
        model.encode(torch.rand(1, 3, H, W))


# -------------------------------------------------------------- config errors


def test_unknown_names_list_valid_ones():
    t = tasks_of(1)
    with pytest.raises(ConfigError, match=r"model\.backbone.*'resnet19'.*resnet18.*tiny"):
        build_model("hps", t, {"name": "resnet19"}, {"name": "light"})
    with pytest.raises(ConfigError, match=r"model\.head.*'deeplab'.*aspp, light"):
        build_model("hps", t, TINY, {"name": "deeplab"})
    with pytest.raises(ConfigError, match=r"model\.arch.*'mtl'.*hps.*stl"):
        build_model("mtl", t, TINY, {"name": "light"})
    with pytest.raises(ConfigError, match=r"model\.backbone.*'name'"):
        build_model("hps", t, {"width": 8}, {"name": "light"})


def test_unknown_options_are_named():
    t = tasks_of(2)
    msg = r"model\.backbone 'resnet18' has no option 'dilate'.*dilated"
    with pytest.raises(ConfigError, match=msg):
        build_model("hps", t, {"name": "resnet18", "dilate": True}, {"name": "light"})
    msg = r"model\.head 'light' has no option 'rates'.*mid_channels"
    with pytest.raises(ConfigError, match=msg):
        build_model("stl", t, TINY, {"name": "light", "rates": [1]})
    # a head's channels come from the task, never from the config
    with pytest.raises(ConfigError, match=r"no option 'out_channels'"):
        build_model("hps", t, TINY, {"name": "light", "out_channels": 3})
    msg = r"model\.arch 'hps' has no option 'alpha'; valid options: \(none\)"
    with pytest.raises(ConfigError, match=msg):
        build_model("hps", t, TINY, {"name": "light"}, {"alpha": 1})
    # a typo in the head config is reported even when only image-level tasks ignore it
    with pytest.raises(ConfigError, match=r"'midchannels'"):
        build_model(
            "hps", {"cls": task("cls", 3, dense=False)}, TINY, {"name": "light", "midchannels": 3}
        )
    with pytest.raises(ConfigError, match="width"):
        build_backbone({"name": "tiny", "width": 0})
