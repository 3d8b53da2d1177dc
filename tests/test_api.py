"""The public Python API (`import mtlcv`): lazy, complete, and the same objects the trainer uses."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import mtlcv
from mtlcv.errors import ConfigError


def test_import_mtlcv_is_lazy():
    code = "import sys, mtlcv; print([m for m in ('torch', 'numpy', 'rich') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_every_public_name_resolves_and_all_is_complete():
    assert set(mtlcv.__all__) == {"__version__", *mtlcv._EXPORTS}
    for name in mtlcv.__all__:
        assert getattr(mtlcv, name) is not None, name
        assert name in dir(mtlcv)
    assert mtlcv.Task is __import__("mtlcv.tasks.base", fromlist=["Task"]).Task
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mtlcv.nope  # noqa: B018


def test_available_lists_the_registries():
    from mtlcv.registry import ALL

    assert mtlcv.available() == {k: reg.names() for k, reg in ALL.items()}
    assert "upgrad" in mtlcv.available("balancer")
    with pytest.raises(ConfigError, match="unknown component kind 'nope'"):
        mtlcv.available("nope")


def test_create_model_is_the_model_a_config_builds():
    from mtlcv.config import from_dict
    from mtlcv.engine.experiment import build_model

    cfg = from_dict(
        {
            "tasks": ["semseg", "depth"],
            "model": {
                "arch": "mtan",
                "backbone": {"name": "tiny", "width": 8},
                "head": {"name": "light", "mid_channels": 4},
                "options": {"reduction": 2},
            },
        }
    )
    tasks = [mtlcv.create_task("semseg"), mtlcv.create_task("depth")]
    torch.manual_seed(0)
    ours = mtlcv.create_model(
        "mtan", tasks, backbone={"name": "tiny", "width": 8}, head={"name": "light",
        "mid_channels": 4}, reduction=2
    )
    torch.manual_seed(0)
    ref = build_model(cfg, {t.name: t for t in tasks})
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # names alone work for backbone and head; unknown options are one-line config errors
    assert isinstance(mtlcv.create_model("hps", tasks, backbone="tiny"), mtlcv.MultiTaskModel)
    with pytest.raises(ConfigError, match="model.arch 'hps' has no option 'reduction'"):
        mtlcv.create_model("hps", tasks, reduction=2)


def test_tasks_take_the_names_and_options_a_dataset_declares():
    left = mtlcv.create_task("classification", name="left", num_classes=4)
    assert (left.name, left.channels) == ("left", 4)
    assert mtlcv.create_task("depth").name == "depth"
    ds = SimpleNamespace(
        task_kinds={"left": "classification", "right": "classification"},
        task_options={"left": {"num_classes": 3}, "semseg": {"num_classes": 5}},
    )
    tasks = mtlcv.create_tasks(["left", "right", "semseg"], ds)
    assert [(t.name, type(t).__name__, t.channels) for t in tasks.values()] == [
        ("left", "Classification", 3),
        ("right", "Classification", 10),
        ("semseg", "Segmentation", 5),
    ]
    with pytest.raises(ConfigError, match="duplicates"):
        mtlcv.create_tasks(["depth", "depth"])


def test_task_losses_are_the_trainers_losses_deep_supervision_included(small_cfg, tmp_path):
    from mtlcv.config import from_dict
    from mtlcv.engine.trainer import Trainer

    small_cfg["model"]["arch"] = "padnet"
    trainer = Trainer(from_dict(small_cfg), tmp_path / "run")
    batch = next(iter(mtlcv.create_loader(trainer.exp.datasets["train"], batch_size=4)))
    preds = trainer.model(batch["image"])
    assert trainer.model.deep_supervision()  # PAD-Net has intermediate predictions to add
    ours = mtlcv.task_losses(trainer.tasks, preds, batch, trainer.model)
    assert torch.equal(ours, trainer._losses(preds, batch))
    plain = mtlcv.task_losses(list(trainer.tasks.values()), preds, batch)  # final outputs only
    assert (plain < ours).all()


def test_evaluate_uses_the_models_device_and_restores_its_mode():
    tasks = [mtlcv.create_task("depth")]
    model = mtlcv.create_model("hps", tasks, backbone={"name": "tiny", "width": 8})
    batch = {"image": torch.rand(3, 3, 16, 16), "depth": torch.full((3, 1, 16, 16), 2.0)}
    model.train()
    m = mtlcv.evaluate(model, tasks, [batch])
    assert model.training and set(m["depth"]) == {"abs_err", "rel_err", "rmse", "delta1"}
    with torch.no_grad():
        model.eval()
        pred = model(batch["image"])["depth"]
    assert m["depth"]["abs_err"] == pytest.approx(float((pred - 2.0).abs().mean()), rel=1e-5)


def test_train_needs_a_run_directory_to_resume():
    with pytest.raises(ConfigError, match="needs out"):
        mtlcv.train(resume=True)
