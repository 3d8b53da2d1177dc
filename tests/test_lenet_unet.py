"""The seed's single-task models as stage-exposing backbones: LeNet-5 and U-Net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlcv.errors import ConfigError, DataError
from mtlcv.models import build_backbone, build_model
from mtlcv.models.backbones.lenet import C3_TABLE
from mtlcv.registry import ARCHS, TASKS


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_lenet5_has_the_papers_60000_parameters_layer_by_layer():
    bb = build_backbone({"name": "lenet", "grayscale": True})
    c1, s2 = bb.stages[0][2], bb.stages[0][4]
    c3, s4 = bb.stages[1][0], bb.stages[1][2]
    c5, f6 = bb.stages[2][0], bb.stages[3][0]
    # LeCun et al. 1998, Sec. II-B
    assert [count(m) for m in (c1, s2, c3, s4, c5, f6)] == [156, 12, 1516, 32, 48120, 10164]
    assert count(bb) == 60000
    assert count(build_backbone({"name": "lenet"})) == 60000 + 2 * 150  # colour C1


def test_lenet5_c3_follows_table_1():
    bb = build_backbone({"name": "lenet"})
    x = torch.randn(1, 6, 14, 14, requires_grad=True)
    out = bb.stages[1][0](x)
    assert out.shape == (1, 16, 10, 10)
    for j, inputs in enumerate(C3_TABLE):
        (grad,) = torch.autograd.grad(out[0, j].sum(), x, retain_graph=True)
        used = [i for i in range(6) if grad[0, i].abs().sum() > 0]
        assert used == sorted(inputs), j


def test_lenet5_maps_32x32_to_1x1_and_refuses_smaller_images():
    bb = build_backbone({"name": "lenet"})
    shapes = [tuple(f.shape) for f in bb.forward_stages(torch.rand(2, 3, 32, 32))]
    assert shapes == [(2, 6, 14, 14), (2, 16, 5, 5), (2, 120, 1, 1), (2, 84, 1, 1)]
    assert bb.stage_channels == [6, 16, 120, 84] and bb.min_size == 32
    with pytest.raises(DataError, match="at least 32x32.*got 28x28"):
        bb(torch.rand(1, 3, 28, 28))
    with pytest.raises(ConfigError, match="grayscale"):
        build_backbone({"name": "lenet", "grayscale": "yes"})


def bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 images of one bar, horizontal (class 0) or vertical (class 1), at a random place."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=g)
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.3
    pos = torch.randint(4, 28, (n,), generator=g)
    for i in range(n):
        if y[i]:
            x[i, :, :, pos[i] - 2 : pos[i] + 2] += 0.7
        else:
            x[i, :, pos[i] - 2 : pos[i] + 2, :] += 0.7
    return x, y


def test_lenet5_learns_a_small_classification_task():
    torch.manual_seed(0)
    tasks = {"classification": TASKS.create("classification", num_classes=2)}
    model = build_model("stl", tasks, {"name": "lenet"}, {"name": "light"})
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, y = bars(256, 0)
    for step in range(48):
        i = torch.arange(32) + 32 * (step % 8)
        loss = tasks["classification"].loss(model(x[i])["classification"], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = bars(200, 1)
    with torch.no_grad():
        acc = (model(xt)["classification"].argmax(1) == yt).float().mean()
    assert acc > 0.9


def test_unet_stages_and_the_papers_tile_sizes():
    bb = build_backbone({"name": "unet", "width": 4})
    assert bb.stage_channels == [4, 8, 16, 32, 64, 32, 16, 8, 4]
    assert bb.stage_strides == [1, 2, 4, 8, 16, 8, 4, 2, 1] and bb.decoder_start == 5
    feats = bb.forward_stages(torch.rand(1, 3, 37, 50))  # odd sizes: the output keeps them
    assert [tuple(f.shape[-2:]) for f in feats][-1] == (37, 50)
    # the paper's unpadded network: a 572x572 tile gives a 388x388 map (Fig. 1)
    valid = build_backbone({"name": "unet", "width": 1, "padding": False})
    assert valid(torch.rand(1, 3, 572, 572)).shape == (1, 1, 388, 388)
    # 23 convolutional layers with the 1x1 output layer (the task head): Sec. 2
    convs = [m for m in bb.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) + 1 == 23
    assert count(build_backbone({"name": "unet"})) == 31_031_680  # 64 .. 1024 channels


def test_unet_skip_connections_carry_the_fine_detail():
    torch.manual_seed(0)
    bb = build_backbone({"name": "unet", "width": 4, "depth": 2})
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    out = bb(x)
    (grad,) = torch.autograd.grad(out[0, :, 5, 5].sum(), x)
    # through the skip of the first block, a pixel's output sees its 5x5 neighbourhood first
    assert grad[0, :, 5, 5].abs().sum() > 0
    with pytest.raises(ConfigError, match="depth"):
        build_backbone({"name": "unet", "depth": 9})


@pytest.mark.parametrize("arch", ARCHS.names())
@pytest.mark.parametrize("backbone", [{"name": "lenet"}, {"name": "unet", "width": 4}],
                         ids=["lenet", "unet"])
def test_every_architecture_takes_lenet_and_unet(arch, backbone):
    torch.manual_seed(0)
    tasks = {"semseg": TASKS.create("semseg", num_classes=5),
             "classification": TASKS.create("classification", num_classes=3)}
    model = build_model(arch, tasks, backbone, {"name": "light"})
    out = model(torch.rand(2, 3, 32, 48))
    assert out["semseg"].shape == (2, 5, 32, 48) and out["classification"].shape == (2, 3)
    deep = [p for preds in model.deep_supervision().values() for _, p in preds]
    sum(o.square().mean() for o in [*out.values(), *deep]).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lenet_trains_on_object_crops_of_the_scenes(scenes_root, tmp_path):
    from mtlcv.config import from_dict
    from mtlcv.data.scenes import DET_CLASSES, ScenesDataset, ScenesObjects
    from mtlcv.engine.trainer import train

    crops = ScenesObjects(ScenesDataset(scenes_root, "train"), crop=32)
    item = crops[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= int(item["classification"]) < 10
    assert len(crops) > 20
    cfg = from_dict({
        "tasks": ["classification"],
        "data": {"name": "scenes-objects", "root": scenes_root, "batch_size": 16,
                 "options": {"n": 48, "size": [32, 48], "seed": 0}},
        "model": {"arch": "stl", "backbone": {"name": "lenet"}},
        "train": {"epochs": 1, "max_steps": 3, "progress": False},
    })
    results = train(cfg, tmp_path / "run", log=lambda _: None)
    assert set(results["test"]["classification"]) == {"accuracy"}
    assert crops.task_options["classification"]["num_classes"] == len(DET_CLASSES)
