"""MultiDigits: deterministic, honest splits, correct composition, and usable by the deep trainer
with every architecture and balancer and by `mtlcv compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlcv import balancing
from mtlcv.config import from_dict
from mtlcv.data.multidigits import _pools, compose
from mtlcv.engine.experiment import build_dataset, build_tasks
from mtlcv.errors import ConfigError
from mtlcv.models.build import build_model
from mtlcv.registry import ARCHS, BALANCERS, DATASETS
from mtlcv.tasks.classification import Classification

SMALL = {"n": 40, "size": 24, "digit_size": 16, "shift": 2, "seed": 0}


def test_deterministic_by_seed_and_different_across_seeds():
    a, b = compose(30, "val", seed=3), compose(30, "val", seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = compose(30, "val", seed=4)
    assert not np.array_equal(a["image"], c["image"])


def test_split_pools_are_disjoint_and_cover_every_digit():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    pools = _pools(labels, seed=0)
    sets = [set(p.tolist()) for p in pools.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == len(labels)
    for p in pools.values():
        assert set(labels[p]) == set(range(10))


def test_left_digit_top_left_right_digit_bottom_right_sum_is_their_sum():
    from sklearn.datasets import load_digits

    out = compose(25, "test", size=32, digit_size=20, shift=0, seed=1)
    assert np.array_equal(out["sum"], out["left"] + out["right"])
    digits = load_digits()
    big = F.interpolate(torch.from_numpy(digits.images / 16.0)[:, None], size=(20, 20),
                        mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    img = out["image"] / 255.0
    for i in range(25):
        # with shift 0 the left digit covers [0, 20)², the right one [12, 32)²; outside the
        # overlap each region is exactly one enlarged digit of the named class
        top_left = img[i, :12, :12]
        matches = [j for j in np.flatnonzero(digits.target == out["left"][i])
                   if np.allclose(np.round(big[j, :12, :12] * 255) / 255, top_left)]
        assert matches, f"image {i}: top-left corner is not a digit {out['left'][i]}"
        bottom_right = img[i, 20:, 20:]
        matches = [j for j in np.flatnonzero(digits.target == out["right"][i])
                   if np.allclose(np.round(big[j, 8:, 8:] * 255) / 255, bottom_right)]
        assert matches, f"image {i}: bottom-right corner is not a digit {out['right'][i]}"


def test_registered_dataset_declares_classification_tasks_under_their_names():
    cfg = from_dict({"tasks": ["left", "right", "sum"],
                     "data": {"name": "multidigits", "options": SMALL}})
    ds = build_dataset(cfg, "train")
    tasks = build_tasks(cfg, ds)
    assert all(isinstance(t, Classification) for t in tasks.values())
    assert [t.name for t in tasks.values()] == ["left", "right", "sum"]
    assert tasks["sum"].num_classes == 19 and tasks["left"].num_classes == 10
    item = ds[0]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert item["left"].dtype == torch.int64 and item["left"].dim() == 0
    assert len(ds) == 32 and len(DATASETS.create("multidigits", split="test", **SMALL)) == 4


def test_augmentation_translates_without_changing_labels():
    ds = DATASETS.create("multidigits", split="train", augment=True, **SMALL)
    plain = DATASETS.create("multidigits", split="train", augment=False, **SMALL)
    torch.manual_seed(0)
    moved = [ds[i] for i in range(8)]
    assert any(not torch.equal(m["image"], plain[i]["image"]) for i, m in enumerate(moved))
    for i, m in enumerate(moved):
        assert int(m["left"]) == int(plain[i]["left"])
        assert abs(float(m["image"].sum()) - float(plain[i]["image"].sum())) < 0.5 * float(
            plain[i]["image"].sum())


@pytest.mark.parametrize("bad,match", [({"n": 2}, "option 'n'"),
                                       ({"digit_size": 40}, "option 'digit_size'"),
                                       ({"shift": 30}, "option 'shift'"),
                                       ({"root": "/x"}, "data.root")])
def test_bad_options_are_one_line_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        DATASETS.create("multidigits", split="train", **{**SMALL, **bad})


@pytest.fixture(scope="module")
def batch():
    ds = DATASETS.create("multidigits", split="train", **SMALL)
    items = [ds[i] for i in range(4)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _step(arch, method, batch):
    torch.manual_seed(0)
    names = ("left", "right", "sum")
    tasks = {t: Classification(19 if t == "sum" else 10) for t in names}
    for t in names:
        tasks[t].name = t
        tasks[t].check_target(batch[t], batch["image"])
    model = build_model(arch, tasks, {"name": "tiny", "width": 4}, {"name": "light"})
    bal = balancing.create(method, num_tasks=3)
    opt = torch.optim.SGD(list(model.parameters()) + list(bal.parameters()), lr=0.01)
    preds = model(batch["image"])
    aux = model.deep_supervision()
    losses = torch.stack([tasks[t].loss(preds[t], batch[t])
                          + sum(w * tasks[t].loss(p, batch[t]) for w, p in aux.get(t, ()))
                          for t in names])
    opt.zero_grad(set_to_none=True)
    bal.backward(losses, model)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


@pytest.mark.parametrize("arch", ARCHS.names())
def test_one_step_of_every_architecture_on_multidigits(arch, batch):
    _step(arch, "fixed", batch)


@pytest.mark.parametrize("method", BALANCERS.names())
def test_one_step_of_every_balancer_on_multidigits(method, batch):
    _step("hps", method, batch)


@pytest.mark.slow
def test_compare_trains_stl_and_hps_on_multidigits(tmp_path, capsys):
    from mtlcv.cli import main

    # 40 val images: Δm divides by the baseline's accuracy, which must not be 0
    cfg = {"name": "md", "seed": 0, "tasks": ["left", "right"],
           "data": {"name": "multidigits", "batch_size": 16, "augment": True,
                    "options": {**SMALL, "n": 400}},
           "model": {"arch": "hps", "backbone": {"name": "tiny", "width": 8},
                     "head": {"name": "light"}},
           "optim": {"name": "adam", "lr": 3e-3},
           "train": {"epochs": 2, "progress": False, "threads": 1}}
    path = tmp_path / "md.yaml"
    path.write_text(json.dumps(cfg))
    rc = main(["compare", "--config", str(path), "--vary", "model.arch=stl,hps",
               "--baseline", "model.arch=stl", "--out", str(tmp_path / "grid")])
    assert rc == 0
    assert "hps" in capsys.readouterr().out
    rows = json.loads((tmp_path / "grid" / "summary.json").read_text())
    hps = next(r for r in rows if r["label"] == "hps")
    assert set(hps["test"]) == {"left", "right"}
    res = json.loads((tmp_path / "grid" / "hps" / "seed0" / "results.json").read_text())
    assert res["higher_is_better"] == {"left": {"accuracy": True}, "right": {"accuracy": True}}


@pytest.mark.parametrize("arch", ["stl", "hps"])
def test_lenet_configs_build_the_papers_lenet_and_learn(arch):
    """configs/multidigits/lenet_{stl,hps}.yaml: LeNet-5 on grey 32x32 images, the paper's
    60,000 trunk parameters per network (one per task for stl, one shared for hps), and a few
    steps on a small training set lower both tasks' losses."""
    from pathlib import Path

    from mtlcv.config import load
    from mtlcv.engine.experiment import build

    root = Path(__file__).resolve().parents[1]
    cfg = load(root / "configs" / "multidigits" / f"lenet_{arch}.yaml")
    assert cfg.model.backbone == {"name": "lenet", "grayscale": True}
    cfg.data.options = {**cfg.data.options, "n": 200}
    exp = build(cfg, splits=("train",))
    heads = sum(p.numel() for n, p in exp.model.named_parameters() if "head" in n)
    trunks = sum(p.numel() for p in exp.model.parameters()) - heads
    assert trunks == 60_000 * (2 if arch == "stl" else 1)
    ds = exp.datasets["train"]
    items = [ds[i] for i in range(64)]
    b = {k: torch.stack([it[k] for it in items]) for k in ("image", "left", "right")}
    opt = torch.optim.Adam(exp.model.parameters(), lr=cfg.optim.lr)
    torch.manual_seed(0)

    def losses():
        out = exp.model(b["image"])
        return torch.stack([exp.tasks[t].loss(out[t], b[t]) for t in ("left", "right")])

    first = losses().detach()
    for _ in range(30):
        opt.zero_grad()
        losses().sum().backward()
        opt.step()
    assert (losses().detach() < 0.7 * first).all()
