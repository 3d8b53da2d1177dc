"""Auxiliary tasks (config ``aux_tasks``): trained and balanced, left out of selection and Δm,
shown apart in tables; the same flag makes PAD-Net/MTI-Net predict them at the intermediate
stage only."""

from __future__ import annotations

import json

import pytest
import torch

from mtlcv.analysis import delta_m
from mtlcv.analysis.tables import comparison_table
from mtlcv.config import from_dict
from mtlcv.engine.experiment import build_tasks
from mtlcv.engine.trainer import Trainer
from mtlcv.errors import ConfigError
from mtlcv.models import build_model


def test_config_checks_aux_tasks():
    assert from_dict({"tasks": ["semseg", "depth"], "aux_tasks": ["depth"]}).aux_tasks == ["depth"]
    with pytest.raises(ConfigError, match="'aux_tasks': 'edges' is not one of the tasks"):
        from_dict({"tasks": ["semseg", "depth"], "aux_tasks": ["edges"]})
    with pytest.raises(ConfigError, match="every task is auxiliary"):
        from_dict({"tasks": ["semseg"], "aux_tasks": ["semseg"]})


def test_aux_tasks_are_trained_but_left_out_of_delta_m(small_cfg, tmp_path):
    base = {"semseg": {"miou": 20.0, "pixel_acc": 50.0}}  # no depth baseline is needed
    (tmp_path / "base.json").write_text(json.dumps({"val": base, "test": base}))
    cfg = dict(small_cfg, tasks=["semseg", "depth"], aux_tasks=["depth"],
               baselines=str(tmp_path / "base.json"))
    cfg["train"] = {"epochs": 1, "max_steps": 2, "progress": False}
    trainer = Trainer(from_dict(cfg), tmp_path / "run", log=lambda _: None)
    before = [p.detach().clone() for p in trainer.model.heads["depth"].parameters()]
    results = trainer.fit()
    after = list(trainer.model.heads["depth"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # depth was trained
    assert results["aux_tasks"] == ["depth"] and "depth" in results["test"]
    hib = {"semseg": {"miou": True, "pixel_acc": True}}
    want = delta_m({"semseg": results["test"]["semseg"]}, base, hib)
    assert results["delta_m"]["test"] == pytest.approx(want)
    assert results["delta_m"]["metrics"] == {"semseg": ["miou", "pixel_acc"]}


def test_selection_by_mean_rank_ignores_aux_tasks(small_cfg, tmp_path):
    cfg = dict(small_cfg, tasks=["semseg", "depth"], aux_tasks=["depth"])
    trainer = Trainer(from_dict(cfg), tmp_path / "run", log=lambda _: None)
    depth = {"abs_err": 0.5, "rel_err": 0.2, "rmse": 0.7, "delta1": 60.0}
    better_depth = {k: v / 10 if k != "delta1" else 99.0 for k, v in depth.items()}
    trainer.history = [{"val": {"semseg": {"miou": 30.0, "pixel_acc": 70.0}, "depth": depth}}]
    trainer.best = {"epoch": 1}
    trainer.history.append(
        {"val": {"semseg": {"miou": 29.0, "pixel_acc": 69.0}, "depth": better_depth}}
    )
    assert not trainer._is_best({})  # a better auxiliary task does not make a better epoch
    trainer.cfg.aux_tasks = []
    assert trainer._is_best({})  # counted as a main task, the depth gains win (5 of 6 metrics)


def test_tables_show_aux_tasks_apart_and_leave_them_out_of_delta_m():
    hib = {"semseg": {"miou": True}, "depth": {"abs_err": False}}
    runs = {"stl": {"test": {"semseg": {"miou": 40.0}, "depth": {"abs_err": 0.5}}},
            "hps": {"test": {"semseg": {"miou": 44.0}, "depth": {"abs_err": 5.0}}}}
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(comparison_table(runs, hib, baseline="stl", aux=["depth"]))
    text = console.export_text()
    assert "depth (aux)" in text and "-10.00%" in text  # Δm of semseg alone: 10 % better
    assert text.index("semseg") < text.index("depth (aux)")


@pytest.mark.parametrize("arch", ["padnet", "mti_net"])
def test_padnet_and_mti_net_predict_aux_tasks_at_the_intermediate_stage_only(arch, scenes_root):
    cfg = from_dict({"tasks": ["semseg", "depth", "normals", "edges"],
                     "aux_tasks": ["normals", "edges"],
                     "data": {"root": scenes_root, "options": {"n": 48, "size": [32, 48]}}})
    from mtlcv.engine.experiment import build_dataset

    tasks = build_tasks(cfg, build_dataset(cfg, "val"))
    assert [t.auxiliary for t in tasks.values()] == [False, False, True, True]
    model = build_model(arch, tasks, {"name": "tiny", "width": 8}, {"name": "light"})
    assert model.final_tasks == ["semseg", "depth"]
    out = model(torch.rand(2, 3, 32, 48))
    assert set(out) == {"semseg", "depth", "normals", "edges"}
    if arch == "padnet":  # an auxiliary task's output is its intermediate prediction
        assert set(model.deep_supervision()) == {"semseg", "depth"}
