"""The trainer end to end: run directory, reload, exact resume, model selection, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from mtlcv.config import from_dict
from mtlcv.engine.checkpoint import load_checkpoint
from mtlcv.engine.trainer import Trainer, train
from mtlcv.errors import CheckpointError, ConfigError, DataError
from mtlcv.registry import DATASETS


def test_train_writes_run_and_reload_reproduces_test_metrics(small_cfg, tmp_path):
    from mtlcv.cli import main

    run = tmp_path / "run"
    results = train(from_dict(small_cfg), run, log=lambda s: None)
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "results.json"):
        assert (run / name).is_file(), name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert set(lines[0]["val"]) == {"semseg", "depth", "normals"}
    saved = json.loads((run / "results.json").read_text())
    assert saved["test"] == results["test"]
    assert saved["wall_time_s"] > 0 and saved["peak_memory_mb"] > 0
    assert saved["selection"] == "mean_rank" and saved["best_epoch"] in (1, 2)
    # the best checkpoint re-evaluated from disk gives exactly the recorded test metrics
    out = tmp_path / "eval.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", "--run", str(run), "--json"]) == 0
    out = json.loads(buf.getvalue())
    for task, metrics in saved["test"].items():
        for m, v in metrics.items():
            assert out["test"][task][m] == pytest.approx(v, rel=1e-6, abs=1e-9)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_is_bitwise_identical(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["epochs"] = 3
    train(from_dict(cfg), tmp_path / "full", log=lambda s: None)

    Trainer(from_dict(cfg), tmp_path / "cut", log=lambda s: None).fit(stop_after_epoch=1)
    assert not (tmp_path / "cut" / "results.json").exists()
    # a fresh process would rebuild everything: a new Trainer does the same here
    torch.manual_seed(1234)  # disturb the global RNG; resume must restore it
    np.random.seed(99)
    train(from_dict(cfg), tmp_path / "cut", resume=True, log=lambda s: None)

    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = load_checkpoint(tmp_path / "full" / "last.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "cut" / "last.pt")["optimizer"]["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert full["test"] == cut["test"]


def test_existing_run_needs_resume_and_same_config(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["epochs"] = 1
    train(from_dict(cfg), tmp_path / "r", log=lambda s: None)
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(from_dict(cfg), tmp_path / "r")
    cfg["optim"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="optim.lr"):
        Trainer(from_dict(cfg), tmp_path / "r", resume=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(from_dict(cfg), tmp_path / "nothing-here", resume=True)


def test_corrupt_checkpoint_names_file(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["epochs"] = 2
    Trainer(from_dict(cfg), tmp_path / "r", log=lambda s: None).fit(stop_after_epoch=1)
    last = tmp_path / "r" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.pt"):
        train(from_dict(cfg), tmp_path / "r", resume=True, log=lambda s: None)


def test_delta_m_selection_against_stl_baselines(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["epochs"] = 2
    cfg["optim"]["lr"] = 1e-2
    cfg["model"]["arch"] = "stl"
    stl = train(from_dict(cfg), tmp_path / "stl", log=lambda s: None)
    assert stl["val"]["depth"]["delta1"] > 0  # Δm divides by every baseline value
    cfg["model"]["arch"] = "hps"
    cfg["baselines"] = str(tmp_path / "stl")
    hps = train(from_dict(cfg), tmp_path / "hps", log=lambda s: None)
    assert hps["selection"] == "delta_m"
    from mtlcv.analysis import delta_m
    from mtlcv.registry import TASKS

    higher = {t: TASKS.create(t).higher_is_better for t in cfg["tasks"]}
    assert hps["delta_m"]["test"] == pytest.approx(delta_m(hps["test"], stl["test"], higher))
    lines = [json.loads(x) for x in (tmp_path / "hps" / "metrics.jsonl").read_text().splitlines()]
    # the kept checkpoint is the epoch with the lowest val Δm
    best = min(lines, key=lambda x: x["delta_m"])
    assert hps["best_epoch"] == best["epoch"]
    assert best["delta_m"] == pytest.approx(hps["delta_m"]["val"])


def test_zero_baseline_is_refused_before_training(small_cfg, tmp_path):
    base = {
        "semseg": {"miou": 10.0, "pixel_acc": 50.0},
        "depth": {"abs_err": 1.0, "rel_err": 0.5, "rmse": 1.2, "delta1": 0.0},
        "normals": {
            "mean": 40.0,
            "median": 35.0,
            "within_11.25": 5.0,
            "within_22.5": 20.0,
            "within_30": 35.0,
        },
    }
    (tmp_path / "results.json").write_text(json.dumps({"test": base}))
    cfg = copy.deepcopy(small_cfg)
    cfg["baselines"] = str(tmp_path / "results.json")
    with pytest.raises(ConfigError, match="'baselines'.*delta1.*is 0.0"):
        Trainer(from_dict(cfg), tmp_path / "r")


def test_unknown_architecture_lists_valid_names(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["model"]["arch"] = "nope"
    with pytest.raises(ConfigError, match=r"unknown architecture 'nope'; valid: .*hps.*stl"):
        train(from_dict(cfg), tmp_path / "r", log=lambda s: None)


class _BadDepth(torch.utils.data.Dataset):
    targets = ("semseg", "depth")
    task_options = {"semseg": {"num_classes": 13}}

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {
            "image": torch.rand(3, 16, 16),
            "semseg": torch.zeros(16, 16, dtype=torch.long),
            "depth": torch.rand(3, 16, 16),  # wrong: depth has one channel
        }


@DATASETS.register("test-bad-depth")
def _bad_depth(split="train", root=None, augment=False):
    return _BadDepth()


def test_wrong_target_shape_names_task_and_shapes(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["tasks"] = ["semseg", "depth"]
    cfg["data"] = {"name": "test-bad-depth", "batch_size": 4}
    with pytest.raises(DataError) as err:
        train(from_dict(cfg), tmp_path / "r", log=lambda s: None)
    msg = str(err.value)
    assert "depth" in msg and "(4, 3, 16, 16)" in msg and "(4, 1, 16, 16)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "optim, schedule, expected_lr",
    [
        (
            {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            {"name": "step", "step_size": 1, "gamma": 0.5},
            [0.01, 0.005],
        ),
        ({"name": "adam", "lr": 0.01}, {"name": "cosine"}, [0.01, 0.005]),
        ({"name": "adamw", "lr": 0.01, "weight_decay": 0.1}, {"name": "none"}, [0.01, 0.01]),
    ],
)
def test_optimizers_and_schedules(small_cfg, tmp_path, optim, schedule, expected_lr):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=2, max_steps=2)
    cfg["optim"], cfg["schedule"] = optim, schedule
    t = Trainer(from_dict(cfg), tmp_path / "r", log=lambda s: None)
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    assert type(t.optimizer) is kind[optim["name"]]
    t.fit()
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in lines] == pytest.approx(expected_lr)
    assert all(x["steps"] == 2 for x in lines)


def test_a_diverging_loss_stops_with_one_line_and_keeps_the_checkpoint(small_cfg, tmp_path):
    from mtlcv.errors import TrainingError

    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=3, max_steps=2)
    t = Trainer(from_dict(cfg), tmp_path / "r", log=lambda s: None)
    t.fit(stop_after_epoch=1)
    saved = (tmp_path / "r" / "last.pt").read_bytes()
    t = Trainer(from_dict(cfg), tmp_path / "r", resume=True, log=lambda s: None)
    depth = t.tasks["depth"]
    depth.loss = lambda pred, target: pred.mean() * float("nan")  # a diverged depth loss
    with pytest.raises(TrainingError, match=r"epoch 2 step 1: non-finite loss for depth"):
        t.fit()
    assert (tmp_path / "r" / "last.pt").read_bytes() == saved


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"num_tasks": 3}, r"'balancer.options.num_tasks': set from 'tasks'"),
        ({"nope": 1}, r"balancer 'pcgrad' has no option 'nope'"),
    ],
)
def test_bad_balancer_options_are_config_errors(small_cfg, tmp_path, options, pattern):
    cfg = copy.deepcopy(small_cfg)
    cfg["balancer"] = {"name": "pcgrad", "options": options}
    with pytest.raises(ConfigError, match=pattern):
        Trainer(from_dict(cfg), tmp_path / "r")


class _TwoDigits(torch.utils.data.Dataset):
    """Two classification tasks under their own names, one learnable from the image."""

    targets = ("left", "right")
    task_kinds = {"left": "classification", "right": "classification"}
    task_options = {"left": {"num_classes": 2}, "right": {"num_classes": 3}}

    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {
            "image": torch.full((3, 16, 16), float(i % 2)),
            "left": torch.tensor(i % 2),
            "right": torch.randint(0, 3, (), generator=g),
        }


@DATASETS.register("test-two-digits")
def _two_digits(split="train", root=None, augment=False):
    return _TwoDigits()


def test_tasks_of_one_kind_under_their_own_names(small_cfg, tmp_path):
    from mtlcv.cli import main

    cfg = copy.deepcopy(small_cfg)
    cfg["tasks"] = ["left", "right"]
    cfg["data"] = {"name": "test-two-digits", "batch_size": 4}
    cfg["train"].update(epochs=1)
    t = Trainer(from_dict(cfg), tmp_path / "r", log=lambda s: None)
    assert [t.tasks[n].name for n in ("left", "right")] == ["left", "right"]
    assert (t.tasks["left"].channels, t.tasks["right"].channels) == (2, 3)
    results = t.fit()
    assert set(results["test"]) == {"left", "right"}
    assert results["higher_is_better"] == {"left": {"accuracy": True}, "right": {"accuracy": True}}
    # eval tabulates them from the run's own record of metric directions
    assert main(["eval", "--run", str(tmp_path / "r"), "--json"]) == 0
