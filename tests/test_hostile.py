"""A table of hostile inputs: each gives exit code 2 and exactly one line on stderr that names the
file, key or value, and never a traceback.

Every case runs the real command line (``mtlcv.cli.main``) in-process. The run directory the
checkpoint cases use is trained once (2 epochs of 1 step).
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mtlcv.cli import main


@dataclass
class Ctx:
    tmp: Path
    base: dict
    root: str
    run: Path

    def config(self, text: str | bytes | None = None, name: str = "c.yaml", **changes: Any) -> str:
        """A config file: ``text`` as is, or the base config with dotted ``changes``."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            data = copy.deepcopy(self.base)
            for key, value in changes.items():
                node = data
                *head, last = key.split("__")
                for part in head:
                    node = node.setdefault(part, {})
                node[last] = value
            text = yaml.safe_dump(data)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return str(path)

    def train(self, *args: str, **changes: Any) -> list[str]:
        return ["train", "--config", self.config(**changes), "--out", str(self.tmp / "out"), *args]

    def copy_run(self) -> Path:
        dst = self.tmp / "run copy"
        shutil.copytree(self.run, dst)
        return dst

    def cache(self, edit: Callable[[dict[str, np.ndarray]], None]) -> str:
        """A copy of the scenes cache whose train split went through ``edit``."""
        dst = self.tmp / "cache"
        shutil.copytree(self.root, dst)
        with np.load(dst / "train.npz") as z:
            arrays = {k: z[k] for k in z.files}
        edit(arrays)
        np.savez_compressed(dst / "train.npz", **arrays)
        return str(dst)


def _save(path: Path, obj: Any) -> None:
    torch.save(obj, path)


class _Evil:
    """A pickle that would create a file when unpickled with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _other_arch_state(ctx: Ctx) -> dict:
    from mtlcv.models.build import build_model
    from mtlcv.registry import TASKS

    tasks = {}
    for t in ("semseg", "depth", "normals"):
        tasks[t] = TASKS.create(t)
        tasks[t].name = t
    model = build_model("stl", tasks, {"name": "tiny", "width": 8}, {"name": "light"})
    return {"epoch": 1, "model": model.state_dict()}


def _eval(ctx: Ctx, make: Callable[[Path], None]) -> list[str]:
    run = ctx.copy_run()
    make(run / "best.pt")
    return ["eval", "--run", str(run)]


def _label(k: str, v: Any) -> Callable[[dict], None]:
    def edit(a: dict) -> None:
        a[k] = a[k].copy()
        a[k].reshape(-1)[5] = v

    return edit


def _negative_depth(a: dict) -> None:
    a["depth"] = -np.abs(a["depth"]) - 1


C = Ctx  # short for the table

# (id, argv maker, pattern the single error line must contain)
CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("malformed YAML", lambda c: ["train", "--config", c.config("tasks: [semseg\nseed: 1\n")],
     r"c\.yaml' is not valid YAML at line \d"),
    ("duplicate YAML key", lambda c: ["train", "--config", c.config("optim: {lr: 1}\noptim: {}\n")],
     r"duplicate key 'optim' \(also at line 1\)"),
    ("non-UTF-8 YAML", lambda c: ["train", "--config", c.config(b"name: caf\xe9\n")],
     r"is not UTF-8 text \(byte 9\)"),
    ("YAML list at the top", lambda c: ["train", "--config", c.config("- semseg\n")],
     r"expected a mapping at the top level"),
    ("config is a folder", lambda c: ["train", "--config", str(c.tmp)], r"is a folder, not a file"),
    ("config missing", lambda c: ["train", "--config", str(c.tmp / "nope.yaml")],
     r"nope\.yaml' does not exist"),
    ("wrong type", lambda c: c.train(train__epochs="ten"),
     r"'train.epochs': got 'ten' \(str\), expected an integer"),
    ("bool for an integer", lambda c: c.train(data__batch_size=True),
     r"'data.batch_size': got True \(bool\), expected an integer"),
    ("empty task list", lambda c: c.train(tasks=[]), r"'tasks': got an empty list"),
    ("duplicate tasks", lambda c: c.train(tasks=["depth", "depth"]), r"'tasks': got duplicates"),
    ("batch size 0", lambda c: c.train(data__batch_size=0),
     r"'data.batch_size': got 0, expected a positive integer"),
    ("NaN learning rate", lambda c: c.train(optim__lr=float("nan")),
     r"'optim.lr': got nan, expected a positive number"),
    ("infinite learning rate", lambda c: c.train("--set", "optim.lr=1e999"),
     r"'optim.lr': got inf"),
    ("negative weight decay", lambda c: c.train(optim__weight_decay=-0.1),
     r"'optim.weight_decay': got -0.1, expected a number >= 0"),
    ("negative momentum", lambda c: c.train(optim__name="sgd", optim__momentum=-0.9),
     r"'optim.momentum': got -0.9, expected a number in \[0, 1\)"),
    ("negative schedule gamma", lambda c: c.train(schedule__name="step", schedule__gamma=-0.5),
     r"'schedule.gamma': got -0.5, expected a positive number"),
    ("seed beyond 64 bits", lambda c: c.train(seed=2**64),
     r"'seed': got 18446744073709551616, expected an integer in \[0, 2\^64\)"),
    ("negative seed", lambda c: c.train(seed=-1), r"'seed': got -1"),
    ("head.mid_channels 0", lambda c: c.train(model__head={"name": "light", "mid_channels": 0}),
     r"mid_channels must be a positive integer, got 0"),
    ("data.options.root", lambda c: c.train("--set", "data.options.root=/elsewhere"),
     r"'data.options.root': set by mtlcv itself"),
    ("data.options.split", lambda c: c.train("--set", "data.options.split=test"),
     r"'data.options.split': set by mtlcv itself"),
    ("unknown architecture", lambda c: c.train(model__arch="hpss"),
     r"unknown architecture 'hpss'; valid: .*hps"),
    ("unknown balancer", lambda c: c.train(balancer={"name": "pcgard"}),
     r"unknown balancer 'pcgard'; valid: "),
    ("unknown dataset", lambda c: c.train(data__name="nyu"), r"unknown dataset 'nyu'; valid: "),
    ("unknown task", lambda c: c.train(tasks=["semseg", "albedo"]),
     r"dataset 'scenes' has no target for albedo"),
    ("unknown config key", lambda c: c.train(optim__lrr=1),
     r"unknown config key 'optim.lrr'; valid keys here"),
    ("unknown component option", lambda c: c.train(model__backbone={"name": "tiny", "widht": 8}),
     r"backbone 'tiny' has no option 'widht'"),
    ("component option of the wrong type",
     lambda c: c.train(model__backbone={"name": "tiny", "width": "8"}),
     r"width must be a positive integer, got '8'"),
    ("--set without =", lambda c: c.train("--set", "optim.lr"), r"expected KEY=VALUE"),
    ("--set with an empty key part", lambda c: c.train("--set", "optim..lr=1"),
     r"expected KEY=VALUE with a dotted key"),
    ("--set into a list", lambda c: c.train("--set", "tasks.x=1"), r"'tasks' is .*not a mapping"),
    ("unknown on_nonfinite", lambda c: c.train(train__on_nonfinite="ignore"),
     r"'train.on_nonfinite': got 'ignore', expected one of stop, skip"),
    ("checkpoint_every 0", lambda c: c.train(train__checkpoint_every=0),
     r"'train.checkpoint_every': got 0, expected a positive integer"),
    ("data root that is a file", lambda c: c.train(data__root=c.config("x: 1", name="f.txt")),
     r"data.root '.*f\.txt' is a file"),
    ("image too small for the backbone",
     lambda c: c.train(data__root=str(c.tmp / "tiny cache"), data__options={"n": 4,
                       "size": [16, 24]}, model__backbone={"name": "segnet"}),
     r"'hps' with backbone 'segnet' cannot process 16x24 images"),
    ("scenes cache label out of range", lambda c: c.train(data__root=c.cache(
        _label("semseg", 200))), r"semseg holds label 200, outside \[0, 13\)"),
    ("scenes cache room type out of range", lambda c: c.train(data__root=c.cache(
        _label("classification", 9))), r"classification holds label 9"),
    ("scenes cache with all depths negative", lambda c: c.train(data__root=c.cache(
        _negative_depth)), r"depth has no positive value"),
    ("scenes cache truncated", lambda c: c.train(data__root=_truncate(c.cache(lambda a: None))),
     r"train\.npz' is corrupt or truncated"),
    ("truncated checkpoint", lambda c: _eval(c, lambda p: p.write_bytes(p.read_bytes()[:300])),
     r"best\.pt' is unreadable"),
    ("foreign checkpoint: a bare tensor", lambda c: _eval(c, lambda p: _save(p, torch.ones(3))),
     r"best\.pt' holds a Tensor, not an mtlcv checkpoint"),
    ("foreign checkpoint: not PyTorch", lambda c: _eval(c, lambda p: p.write_text("hello")),
     r"best\.pt' is unreadable"),
    ("checkpoint of another architecture (eval)",
     lambda c: _eval(c, lambda p: _save(p, _other_arch_state(c))),
     r"best\.pt' does not match the model of .*config\.yaml' \(model\.arch 'hps'\)"),
    ("checkpoint with a missing model (eval)", lambda c: _eval(c, lambda p: _save(p, {"x": 1})),
     r"best\.pt' does not match the model"),
    ("checkpoint that would run code (eval)",
     lambda c: _eval(c, lambda p: _save(p, {"model": _Evil(c.tmp / "pwned")})),
     r"best\.pt' holds objects other than tensors .* refusing to unpickle"),
    ("checkpoint of another architecture (--resume)", lambda c: _resume_swapped(c),
     r"last\.pt' does not match this experiment"),
    ("--resume of a cosine run to more epochs",
     lambda c: ["train", "--out", str(c.copy_run()), "--resume", "--set", "train.epochs=5"],
     r"its cosine schedule spans train\.epochs=2 .* keep train\.epochs=2"),
    ("--resume to fewer epochs than done",
     lambda c: ["train", "--out", str(c.copy_run()), "--resume", "--set", "train.epochs=1",
                "--set", "schedule.name=cosine"],
     r"train\.epochs=1: the run has already trained 2 epochs"),
    ("--out is a file", lambda c: ["train", "--config", c.config(), "--out",
                                   c.config("x", name="o.txt")],
     r"o\.txt' is a file, not a folder"),
    ("--out below a file", lambda c: ["train", "--config", c.config(), "--out",
                                      c.config("x", name="o.txt") + "/run"],
     r"cannot create the run directory .*o\.txt/run': Not a directory"),
    ("path with spaces and non-ASCII", lambda c: ["train", "--config", c.config(
        "tasks: [", name="dír with spä ces/cönfig ü.yaml")],
     r"config file '.*/dír with spä ces/cönfig ü\.yaml' is not valid YAML"),
    ("eval of a folder that is not a run", lambda c: ["eval", "--run", str(c.tmp)],
     r"is not a run directory \(no config\.yaml\)"),
    ("compare seeds that are not integers",
     lambda c: ["compare", "--config", c.config(), "--seeds", "0,one", "--out", str(c.tmp / "g")],
     r"--seeds '0,one': expected comma-separated integers"),
    ("compare: a typo in the last variant", lambda c: ["compare", "--config", c.config(),
                                                      "--vary", "balancer.name=fixed,pcgradd",
                                                      "--out", str(c.tmp / "g")],
     r"variant 'pcgradd': balancer: unknown balancer 'pcgradd'"),
    ("data check of a missing kind", lambda c: ["data", "check", str(c.tmp), "--kind", "nyuv2"],
     r"dataset folder not found|no train/ folder|missing split folder"),
]


def _truncate(root: str) -> str:
    p = Path(root) / "train.npz"
    p.write_bytes(p.read_bytes()[:1000])
    return root


def _resume_swapped(c: Ctx) -> list[str]:
    run = c.copy_run()
    _save(run / "last.pt", _other_arch_state(c))
    return ["train", "--out", str(run), "--resume", "--set", "train.epochs=2"]


@pytest.fixture(scope="module")
def run_dir(scenes_root, tmp_path_factory):
    """A finished 2-epoch run (1 step each)."""
    from mtlcv.config import from_dict
    from mtlcv.engine.trainer import train

    out = tmp_path_factory.mktemp("hostile") / "run"
    train(from_dict(_base(scenes_root) | {"train": {"epochs": 2, "max_steps": 1,
                                                     "progress": False}}), out, log=lambda s: None)
    return out


def _base(root: str) -> dict:
    return {
        "name": "hostile",
        "tasks": ["semseg", "depth", "normals"],
        "data": {"name": "scenes", "root": root, "batch_size": 4,
                 "options": {"n": 48, "size": [32, 48], "seed": 0}},
        "model": {"arch": "hps", "backbone": {"name": "tiny", "width": 8},
                  "head": {"name": "light"}},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 1, "max_steps": 1, "progress": False},
    }


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_exit_2(case, scenes_root, run_dir, tmp_path, capsys):
    _, make, pattern = case
    ctx = Ctx(tmp_path, _base(scenes_root), scenes_root, run_dir)
    argv = make(ctx)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert rc == 2, err
    if argv[:2] == ["data", "check"]:  # data check lists problems on stdout, one per line
        return
    assert len(lines) == 1 and lines[0].startswith("mtlcv: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "pwned").exists()  # no checkpoint ever ran code
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_paths_with_spaces_and_non_ascii_work(tmp_path, capsys):
    out = tmp_path / "dír spä ce" / "cäche ü"
    assert main(["data", "scenes", "--n", "3", "--size", "8x8", "--out", str(out)]) == 0
    from mtlcv.data.scenes import ScenesDataset

    assert len(ScenesDataset(out, "train")) == 1
