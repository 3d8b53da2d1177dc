"""Output a script can read (`--json`), exact `eval`, a fast and strict `list`, `data check` on a
scenes cache, run files written with the user's umask, and progress during validation."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import rich
import torch

import mtlcv
from mtlcv.cli import main


@pytest.fixture(scope="module")
def trained_run(scenes_root, tmp_path_factory) -> Path:
    """A one-epoch run on the small scenes cache, trained with augmentation and umask 022."""
    out = tmp_path_factory.mktemp("scriptable") / "run"
    old = os.umask(0o022)
    try:
        mtlcv.train(
            {
                "name": "small",
                "tasks": ["semseg", "depth"],
                "data": {"root": scenes_root, "batch_size": 4, "augment": True,
                         "options": {"n": 48, "size": [32, 48]}},
                "model": {"arch": "hps", "backbone": {"name": "tiny", "width": 8}},
                "optim": {"lr": 0.01},
                "train": {"epochs": 1, "progress": False, "threads": 1},
            },
            out,
            log=lambda line: None,
        )
    finally:
        os.umask(old)
    return out


# ---------------------------------------------------------------------- eval


def test_eval_never_augments_and_labels_the_split(trained_run, capsys):
    from mtlcv.config import load
    from mtlcv.engine.experiment import build, make_loader

    args = ["eval", "--run", str(trained_run), "--split", "train", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == first  # the RNG moved on; the numbers did not
    assert first["split"] == "train" and "train" in first and "test" not in first
    assert first["higher_is_better"]["depth"]["abs_err"] is False
    # they are the metrics of the un-augmented training split...
    cfg = load(trained_run / "config.yaml")
    exp = build(cfg, splits=("train",), augment=False)
    exp.model.load_state_dict(torch.load(trained_run / "best.pt")["model"])
    plain = mtlcv.evaluate(exp.model, exp.tasks, make_loader(cfg, exp.datasets["train"], False))
    assert first["train"] == plain
    # ...which the augmented split (what eval used to score) does not give
    aug = build(cfg, splits=("train",))
    assert aug.datasets["train"].augment
    torch.manual_seed(1)
    flipped = mtlcv.evaluate(exp.model, exp.tasks, make_loader(cfg, aug.datasets["train"], False))
    assert flipped != plain


def test_eval_json_stdout_is_json_alone_even_when_the_data_is_rendered(trained_run, tmp_path,
                                                                        capsys):
    fresh = tmp_path / "fresh-cache"  # eval renders the cache here first, printing a note
    args = ["eval", "--run", str(trained_run), "--split", "val", "--json",
            "--set", f"data.root={fresh}"]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["split"] == "val" and set(result["val"]) == {"semseg", "depth"}
    assert "rendering" in captured.err and (fresh / "meta.json").is_file()


def test_eval_against_baselines_of_each_split(trained_run, capsys):
    base = ["eval", "--run", str(trained_run), "--json", "--set", f"baselines={trained_run}"]
    assert main([*base, "--split", "test"]) == 0
    # the run against its own results: the best checkpoint's test metrics give Δm = 0 exactly
    assert json.loads(capsys.readouterr().out)["delta_m"] == 0.0
    assert main([*base, "--split", "train"]) == 0  # baselines have no train metrics: no Δm
    assert "delta_m" not in json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------- run files


def test_run_files_are_written_with_the_users_umask(trained_run, tmp_path):
    from mtlcv.engine.checkpoint import atomic_save, atomic_write_text

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in trained_run.iterdir() if p.is_file()}
    assert {"last.pt", "best.pt", "results.json", "config.yaml", "metrics.jsonl"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes  # trained under umask 022
    old = os.umask(0o077)
    try:
        atomic_save({"a": 1}, tmp_path / "private.pt")
        atomic_write_text("x", tmp_path / "private.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.pt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.pt", "private.txt"]


# ---------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_validation_shows_progress_on_a_terminal(small_cfg, tmp_path, monkeypatch):
    from mtlcv.config import from_dict
    from mtlcv.engine.trainer import Trainer

    small_cfg["train"].update(epochs=1, progress=True, max_steps=2)
    monkeypatch.setenv("TERM", "xterm")  # rich draws nothing on a "dumb" terminal (CI's)
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    # rich's shared console fixes "interactive" when first made: make it anew on the terminal
    monkeypatch.setattr(rich, "_console", None)
    Trainer(from_dict(small_cfg), tmp_path / "run", log=lambda line: None).fit()
    text = term.getvalue()
    assert "epoch 1 val" in text and "test" in text
    # progress: false shows nothing, on a terminal too
    small_cfg["train"]["progress"] = False
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    Trainer(from_dict(small_cfg), tmp_path / "quiet", log=lambda line: None).fit()
    assert term.getvalue() == ""


# ---------------------------------------------------------------------- list


def test_list_json_names_every_component(capsys):
    from mtlcv.registry import ALL

    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["kind"], r["name"]) for r in rows} == {
        (k, n) for k, reg in ALL.items() for n in reg.names()
    }
    assert not any("complexity" in r for r in rows)  # a plain list builds no architecture


def test_list_architecture_json_counts_parameters_and_flops(capsys):
    from mtlcv.models.complexity import count_flops, count_parameters

    assert main(["list", "architecture", "--size", "32x48", "--json"]) == 0
    rows = {r["name"]: r["complexity"] for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(mtlcv.available("architecture"))
    tasks = mtlcv.create_tasks(["semseg", "depth", "normals"])
    hps = mtlcv.create_model("hps", tasks, backbone="tiny")
    assert rows["hps"]["parameters"] == count_parameters(hps)
    assert rows["hps"]["flops"] == count_flops(hps, (32, 48)) and rows["hps"]["size"] == [32, 48]


def test_plain_list_builds_no_architecture(monkeypatch, capsys):
    import mtlcv.models.complexity as complexity

    def boom(*args, **kwargs):
        raise AssertionError("a plain `mtlcv list` must not build architectures")

    monkeypatch.setattr(complexity, "arch_size", boom)
    assert main(["list"]) == 0
    assert "architecture  hps" in capsys.readouterr().out


def test_list_with_an_unknown_backbone_is_one_line_exit_2(capsys):
    assert main(["list", "architecture", "--backbone", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "unknown backbone 'nope'" in captured.err and "tiny" in captured.err  # the valid ones


# ---------------------------------------------------------------------- compare, bench


@pytest.mark.slow
def test_compare_json_stdout_is_json_alone(small_cfg, tmp_path, capsys):
    import yaml

    small_cfg["train"]["epochs"] = 1
    small_cfg["train"]["max_steps"] = 2
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(small_cfg))
    args = ["compare", "--config", str(path), "--vary", "balancer.name=fixed,rlw",
            "--out", str(tmp_path / "grid"), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["label"] for r in rows] == ["fixed", "rlw"]
    assert "epoch 1/1" in captured.err and "[1/2]" in captured.err  # the logs went to stderr


def test_bench_json_parses_and_stderr_has_no_profiler_messages(capfd):
    """capfd: the profiler's messages are written by C++ to file descriptor 2 directly."""
    args = ["bench", "balancing", "--json", "--quick", "--methods", "fixed", "mgda",
            "--configs", "tiny-64x80-T3", "--steps", "1", "--warmup", "0"]
    assert main(args) == 0
    captured = capfd.readouterr()
    res = json.loads(captured.out)
    assert set(res["methods"]) == {"fixed", "mgda"}
    assert res["methods"]["mgda"]["results"]["tiny-64x80-T3"]["peak_bytes"] > 0
    lines = captured.err.splitlines()
    assert lines and all(line.startswith("[bench balancing]") for line in lines), lines


# ---------------------------------------------------------------------- data check


def test_data_check_recognises_a_scenes_cache(tmp_path, capsys):
    from mtlcv.data.scenes import write_cache

    root = write_cache(tmp_path / "cache", n=12, size=(16, 24), seed=3, progress=False)
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "OK (scenes cache, 12 images at 16×24, seed 3" in out and "train 10" in out
    # a bad value is named with its file
    with np.load(root / "val.npz") as z:
        arrays = dict(z)
    arrays["depth"][0, 0, 0, 0] = -1.0
    np.savez_compressed(root / "val.npz", **arrays)
    assert main(["data", "check", str(root)]) == 2
    out = capsys.readouterr().out
    assert f"{root / 'val.npz'}: depth has non-finite or non-positive values" in out
    # an interrupted cache (no meta.json) is recognised and said to be incomplete
    (root / "meta.json").unlink()
    assert main(["data", "check", str(root)]) == 2
    assert "holds no complete scenes cache (no meta.json)" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path)]) == 2  # no layout at all names scenes too
    assert "a scenes cache" in capsys.readouterr().out
