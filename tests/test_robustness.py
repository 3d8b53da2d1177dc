"""One writer per run directory, file-system faults as one line, and compare's guard rails.

Each test reproduces a defect found by using mtlcv as a new user would (issue 13, item 6).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtlcv.cli import main, new_run_dir
from mtlcv.config import from_dict
from mtlcv.engine.runlock import RunLocked
from mtlcv.engine.trainer import Trainer, train
from mtlcv.errors import ConfigError


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("mtlcv: error: "), err
    return lines[0]


# ---------------------------------------------------------------------- one writer
@pytest.mark.slow
def test_a_second_process_on_the_same_run_directory_is_refused(small_cfg, tmp_path, capsys):
    """Two writers of one run directory used to both 'succeed', interleaving metrics.jsonl;
    now the second is refused in one line naming the first (pid and host), and ``compare``
    respects the lock of a run it would train."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=3, max_steps=4, threads=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "grid" / "base" / "seed0"
    first = subprocess.Popen(
        [sys.executable, "-m", "mtlcv", "train", "--config", str(path), "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        end = time.monotonic() + 120
        while not (run / ".lock").exists():
            assert first.poll() is None and time.monotonic() < end, first.communicate()
            time.sleep(0.01)
        holder = f"pid {first.pid} on host '{socket.gethostname()}'"
        assert main(["train", "--config", str(path), "--out", str(run)]) == 2
        assert holder in _one_error_line(capsys)
        assert main(["train", "--out", str(run), "--resume"]) == 2
        line = _one_error_line(capsys)
        assert holder in line or "does not exist" in line  # no last.pt yet, or locked
        assert main(["compare", "--config", str(path), "--out", str(tmp_path / "grid")]) == 2
        assert holder in _one_error_line(capsys)
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert not (run / ".lock").exists()


def test_one_process_cannot_open_a_run_twice_and_a_dead_holder_is_stale(small_cfg, tmp_path):
    cfg = from_dict(small_cfg)
    a = Trainer(cfg, tmp_path / "r", log=lambda s: None)
    with pytest.raises(RunLocked, match=rf"in use by pid {os.getpid()} on host"):
        Trainer(cfg, tmp_path / "r", log=lambda s: None)
    a.close()
    # a lock file left by a process that no longer runs (SIGKILL leaves one behind)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".lock").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "command": "mtlcv train", "since": 0}))
    logs: list[str] = []
    b = Trainer(cfg, tmp_path / "s", log=logs.append)
    assert any(f"took over the stale lock of pid {dead.pid}" in x for x in logs)
    assert json.loads((tmp_path / "s" / ".lock").read_text())["pid"] == os.getpid()
    b.close()
    assert not (tmp_path / "s" / ".lock").exists()


def test_default_run_directories_never_collide(tmp_path):
    """``runs/NAME-TIMESTAMP`` had a one-second resolution: parallel launches shared a folder."""
    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(new_run_dir(tmp_path, "exp")))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 16 and len(set(made)) == 16
    assert all(p.is_dir() and p.parent == tmp_path and p.name.startswith("exp-") for p in made)


# ---------------------------------------------------------------------- file-system faults
def _read_only(monkeypatch, below: Path) -> None:
    """Every folder or file created below ``below`` fails as on a read-only file system."""
    real_mkdir, real_open = pathlib.Path.mkdir, os.open

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(below)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(below)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)


def _disk_full(monkeypatch) -> None:
    """Checkpoint and cache writes fail as on a full disk."""
    import torch

    from mtlcv.data import scenes
    from mtlcv.engine import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(scenes.np, "savez_compressed", full)
    assert torch.save is full  # the same module object: restored by monkeypatch


def _argv(command: str, cfg_path: Path, out: Path) -> list[str]:
    if command == "train":
        return ["train", "--config", str(cfg_path), "--out", str(out)]
    if command == "compare":
        return ["compare", "--config", str(cfg_path), "--out", str(out)]
    return ["data", "scenes", "--n", "3", "--size", "8x8", "--out", str(out)]


FAULTS = {
    "disk full": r"no space left on device",
    "read-only file system": r"read-only file system",
    "--out is a file": r"is a file",
    "--out below a file": r"Not a directory",
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("command", ["train", "compare", "data scenes"])
def test_file_system_faults_are_one_line(command, fault, small_cfg, tmp_path, monkeypatch,
                                         capsys):
    """12 cases that used to end in raw tracebacks."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=1, max_steps=1)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    a_file = tmp_path / "a file"
    a_file.write_text("x")
    out = {"--out is a file": a_file, "--out below a file": a_file / "run"}.get(
        fault, tmp_path / "ro" / "out")
    if fault == "read-only file system":
        _read_only(monkeypatch, tmp_path / "ro")
    elif fault == "disk full":
        _disk_full(monkeypatch)
    assert main(_argv(command, cfg_path, out)) == 2
    line = _one_error_line(capsys)
    assert __import__("re").search(FAULTS[fault], line), line
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".tmp.npz", ".lock"))]
    assert not leftovers, leftovers


def test_scenes_cache_written_under_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    from mtlcv.data.scenes import write_cache
    from mtlcv.errors import DataError

    _disk_full(monkeypatch)
    with pytest.raises(DataError, match="cannot write the scenes cache .*no space left"):
        write_cache(tmp_path / "c", n=3, size=(8, 8), progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == []


# ---------------------------------------------------------------------- compare
def test_compare_checks_every_variant_before_training_any(small_cfg, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small_cfg))
    grid = tmp_path / "grid"
    args = ["compare", "--config", str(path), "--out", str(grid), "--vary",
            "model.arch=hps,stl", "--vary", "model.head.name=light,deeplab"]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "variant 'hps-deeplab'" in line and "unknown head 'deeplab'" in line
    assert not grid.exists()  # nothing trained, nothing written


def test_compare_values_with_slashes_stay_inside_out(scenes_root, small_cfg, tmp_path, capsys):
    """A value with '/' used to become a path: a run was written into the data folder."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=1, max_steps=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in Path(scenes_root).iterdir())
    grid = tmp_path / "grid"
    assert main(["compare", "--config", str(path), "--out", str(grid), "--vary",
                 f"data.root={scenes_root}"]) == 0
    assert sorted(p.name for p in Path(scenes_root).iterdir()) == before
    runs = list(grid.rglob("results.json"))
    assert len(runs) == 1 and runs[0].parent.parent.parent == grid
    assert "/" not in runs[0].parent.parent.name


def test_variant_labels_are_folder_names():
    from mtlcv.engine.grid import variants

    vs = variants([("data.root", ["/data/a", "../b", "c d", "é"])])
    assert [v.label for v in vs] == ["data_a", "b", "c_d", "_"]
    with pytest.raises(ConfigError, match="would both be written to the folder 'a_b'"):
        variants([("data.root", ["a/b", "a b"])])


# ---------------------------------------------------------------------- resume
def test_resume_to_more_epochs(small_cfg, tmp_path):
    """A finished 2-epoch cosine run resumed with train.epochs=3 used to keep the old schedule
    silently (lr 0 in epoch 3) while config.yaml claimed a 3-epoch cosine run; it is refused.
    A schedule that does not depend on the number of epochs continues exactly."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=2, max_steps=1)
    train(from_dict(cfg), tmp_path / "cos", log=lambda s: None)
    more = copy.deepcopy(cfg)
    more["train"]["epochs"] = 3
    with pytest.raises(ConfigError, match=r"cosine schedule spans train.epochs=2"):
        Trainer(from_dict(more), tmp_path / "cos", resume=True).fit()
    assert not (tmp_path / "cos" / ".lock").exists()
    for c in (cfg, more):
        c["schedule"] = {"name": "step", "step_size": 1, "gamma": 0.5}
    train(from_dict(cfg), tmp_path / "step", log=lambda s: None)
    train(from_dict(more), tmp_path / "step", resume=True, log=lambda s: None)
    train(from_dict(more), tmp_path / "whole", log=lambda s: None)
    def lrs(run: str) -> list[float]:
        text = (tmp_path / run / "metrics.jsonl").read_text()
        return [json.loads(x)["lr"] for x in text.splitlines()]

    lr, ref = lrs("step"), lrs("whole")
    assert lr == ref == pytest.approx([1e-3, 5e-4, 2.5e-4])


def test_checkpoints_hold_only_plain_values(small_cfg, tmp_path):
    """Everything saved loads with weights_only=True (RNG states included)."""
    import torch

    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=1, max_steps=1)
    cfg["balancer"] = {"name": "dbmtl"}  # a balancer with extra state
    train(from_dict(cfg), tmp_path / "r", log=lambda s: None)
    for name in ("last.pt", "best.pt"):
        obj = torch.load(tmp_path / "r" / name, weights_only=True)
        assert isinstance(obj, dict) and "model" in obj
    rng = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["rng"]
    assert isinstance(rng["numpy"]["keys"], torch.Tensor) and len(rng["python"][1]) == 625
    assert np.asarray(rng["numpy"]["keys"]).shape == (624,)


def test_checkpoints_of_earlier_versions_still_resume(small_cfg, tmp_path):
    """Checkpoints written before RNG states were plain hold NumPy's state as an array: they
    load (NumPy arrays are data, allow-listed), and nothing else is allowed."""
    import random

    import torch

    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=2, max_steps=1)
    Trainer(from_dict(cfg), tmp_path / "r", log=lambda s: None).fit(stop_after_epoch=1)
    last = tmp_path / "r" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    random.seed(3)
    np.random.seed(3)
    ckpt["rng"]["python"], ckpt["rng"]["numpy"] = random.getstate(), np.random.get_state()
    torch.save(ckpt, last)  # the format of earlier versions
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(last, weights_only=True)
    results = train(from_dict(cfg), tmp_path / "r", resume=True, log=lambda s: None)
    assert results["epochs"] == 2
