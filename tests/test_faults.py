"""Never lose a run: SIGTERM, SIGKILL at random moments (one mid-write), full disks, NaN losses,
two writers, and what is left behind.

The kills are real: ``mtlcv train`` runs as a subprocess and is signalled while it trains; every
checkpoint it leaves must load, and the run resumed from it must end bitwise where an
uninterrupted run ends (CPU, one thread).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mtlcv.config import from_dict
from mtlcv.engine.checkpoint import load_checkpoint
from mtlcv.engine.trainer import Trainer, train
from mtlcv.errors import CheckpointError, Preempted, TrainingError

HOOKS = Path(__file__).parent / "fault_hooks"


def _fault_cfg(small_cfg: dict) -> dict:
    """4 epochs x 8 steps, a checkpoint after every step, augmentation on."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=4, max_steps=8, checkpoint_every=1, threads=1, device="cpu")
    return cfg


@pytest.fixture(scope="module")
def reference(small_cfg_module, tmp_path_factory):
    """The uninterrupted run: its final weights and results."""
    out = tmp_path_factory.mktemp("ref") / "run"
    results = train(from_dict(_fault_cfg(small_cfg_module)), out, log=lambda s: None)
    return load_checkpoint(out / "last.pt")["model"], results


@pytest.fixture(scope="module")
def small_cfg_module(scenes_root):
    """conftest's small_cfg, for module-scoped fixtures."""
    from conftest import small_config

    return small_config(scenes_root)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLCV_TEST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HOOKS), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra)
    return env


def _start(config: Path, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mtlcv", "train", "--config", str(config), "--out", str(out),
         "--auto-resume"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env),
    )


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _wait_for_new_checkpoint(proc: subprocess.Popen, last: Path, timeout: float = 120) -> bool:
    """Until ``last`` is replaced by a new file (True) or the process ends (False)."""
    before = _inode(last)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if _inode(last) not in (None, before):
            return True
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_bitwise(small_cfg_module, reference,
                                                               tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_fault_cfg(small_cfg_module)))
    out = tmp_path / "run"
    proc = _start(cfg, out)
    assert _wait_for_new_checkpoint(proc, out / "last.pt")  # step 1 of epoch 1 is saved
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "SIGTERM received" in lines[0]
    assert lines[-1].startswith("mtlcv: stopped by SIGTERM after epoch 1 step ")
    assert "--resume" in lines[-1] and "Traceback" not in err
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 0 and 1 <= ckpt["step"] < 8  # mid-epoch
    assert not (out / ".lock").exists()
    results = train(from_dict(_fault_cfg(small_cfg_module)), out, resume=True, log=lambda s: None)
    ref_weights, ref_results = reference
    assert _same_weights(load_checkpoint(out / "last.pt")["model"], ref_weights)
    assert results["test"] == ref_results["test"]
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_write_loses_nothing(small_cfg_module, reference,
                                                               tmp_path, capsys):
    """Five SIGKILLs at random moments (one to three checkpoints on, then a few milliseconds) and
    one during a checkpoint write: every checkpoint left behind loads, and the run resumed after the
    last kill ends bitwise equal to the uninterrupted run."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_fault_cfg(small_cfg_module)))
    out, last = tmp_path / "run", tmp_path / "run" / "last.pt"
    rng = random.Random(13)
    table = []
    for k in range(6):
        mid_write = k == 5  # the last: the resume below must clean up after it
        marker = tmp_path / f"writing{k}"
        proc = _start(cfg, out, **({"MTLCV_TEST_HANG_IN_SAVE": str(marker)} if mid_write else {}))
        if mid_write:
            end = time.monotonic() + 120
            while not marker.exists():
                assert proc.poll() is None and time.monotonic() < end, proc.communicate()
                time.sleep(0.01)
            before = last.read_bytes()
        else:
            # a random moment: one to three checkpoints on, then up to 20 ms into the next step
            # (each round makes progress, and 6 rounds cannot finish the 32 steps)
            for _ in range(rng.randint(1, 3)):
                assert _wait_for_new_checkpoint(proc, last), proc.communicate()
            time.sleep(rng.uniform(0.0, 0.02))
        proc.kill()
        proc.communicate(timeout=60)
        ckpt = load_checkpoint(last)  # never unreadable
        tmps = sorted(p.name for p in out.glob(".last.pt.*.tmp"))
        if mid_write:
            assert last.read_bytes() == before  # the half-written file never replaced it
            assert tmps, "the interrupted write's temporary file"
        table.append((k + 1, "SIGKILL mid-write" if mid_write else "SIGKILL", ckpt["epoch"],
                      ckpt["step"], len(tmps)))
    results = train(from_dict(_fault_cfg(small_cfg_module)), out, resume=True, log=print)
    logged = capsys.readouterr().out
    assert "left by an interrupted write" in logged
    assert not list(out.glob(".*.tmp"))
    ref_weights, ref_results = reference
    assert _same_weights(load_checkpoint(last)["model"], ref_weights)
    assert results["test"] == ref_results["test"]
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    with capsys.disabled():
        print("\nfault | kind | resumed from epoch, step | tmp files left")
        for row in table:
            print(" | ".join(map(str, row)))


#: what a mid-epoch resume must carry beyond the weights: FAMO's logits, Adam moments and
#: previous losses (its same-batch closure runs after every step), SI (stateless), and an
#: optimizer with parameter groups (cross-stitch units at 100 x lr; the balancer's log-variances
#: at their own lr, never decayed) beside auxiliary tasks and the published protocol's
#: last-epochs test records
RESUME_CASES = {
    "fixed": {},
    "famo": {"balancer": {"name": "famo"}},
    "si": {"balancer": {"name": "si"}},
    # Auto-λ: λ and its Adam state, the held-out order, SGD's momentum in the virtual step
    "autol": {"balancer": {"name": "autol", "options": {"lr": 0.01}},
              "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
    "groups-aux-published": {
        "model": {"arch": "cross_stitch", "backbone": {"name": "tiny", "width": 8},
                  "head": {"name": "light"}},
        "balancer": {"name": "uncertainty", "options": {"lr": 0.025}},
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
        "aux_tasks": ["normals"],
        "eval": {"protocol": "published", "last_epochs": 2},
    },
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_mid_epoch_stop_then_resume_is_bitwise_in_process(small_cfg, tmp_path, case):
    """``train.checkpoint_every`` and a stop request between steps: the resumed run continues
    mid-epoch with the same data order (augmentation on) and ends bitwise as the whole run,
    balancer state, optimizer groups and results included."""
    cfg = {**copy.deepcopy(small_cfg), **copy.deepcopy(RESUME_CASES[case])}
    cfg["train"].update(epochs=2, max_steps=5, checkpoint_every=2)
    cfg["data"]["eval_batch_size"] = 2
    ref = Trainer(from_dict(cfg), tmp_path / "ref", log=lambda s: None)
    ref.fit()
    t = Trainer(from_dict(cfg), tmp_path / "cut", log=lambda s: None)
    step = t.train_step

    def stop_after_7(batch):
        out = step(batch)
        if t.global_step == 6:  # this is the 7th step: epoch 2, step 2
            t.request_stop("a test")
        return out

    t.train_step = stop_after_7
    with pytest.raises(Preempted, match="stopped by a test after epoch 2 step 2"):
        t.fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 2
    torch.manual_seed(99)  # a new process: the global RNG is restored from the checkpoint
    again = Trainer(from_dict(cfg), tmp_path / "cut", resume=True, log=lambda s: None)
    results = again.fit()
    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert _same_weights(a["model"], b["model"])
    assert _same_weights(a["balancer"], b["balancer"])
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["history"][-1]["balancer"] == b["history"][-1]["balancer"]
    assert a["meta"] == b["meta"] and a["meta"]["model"]["arch"] == cfg["model"]["arch"]
    for x, y in zip(ref.optimizer.param_groups, again.optimizer.param_groups):
        assert {k: v for k, v in x.items() if k != "params"} == \
            {k: v for k, v in y.items() if k != "params"}
    ref_results = json.loads((tmp_path / "ref" / "results.json").read_text())
    for key in ("val", "test", "protocol", "aux_tasks", "selection"):
        assert results[key] == ref_results[key], key
    if case == "famo":  # the closure ran: the logits moved away from equal weights
        assert int(b["balancer"]["has_prev"]) == 1
        assert not torch.equal(b["balancer"]["logits"], torch.zeros(3, dtype=torch.float64))
    if case == "autol":  # the meta step ran: λ and the Adam moments moved
        assert int(b["balancer"]["adam_steps"]) == 10
        assert not torch.equal(b["balancer"]["meta_weights"], torch.full((3,), 0.1))
    if case == "groups-aux-published":
        groups = again.optimizer.param_groups
        scale = [g["lr"] / g["initial_lr"] for g in groups]  # one schedule over every group
        assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 0.1, 0.025])
        assert scale == pytest.approx([scale[0]] * 3)
        assert [g["weight_decay"] for g in groups] == [1e-4, 1e-4, 0.0]
        assert results["aux_tasks"] == ["normals"]
        assert results["protocol"]["epochs_averaged"] == [1, 2]
        assert all("test" in h for h in b["history"])


def _enospc_on(monkeypatch, name: str, nth: int = 1) -> None:
    """The ``nth`` write of ``name`` fails as on a full disk (after writing some bytes)."""
    from mtlcv.engine import checkpoint

    real = checkpoint._write_atomically
    calls = {"n": 0}

    def write(path, fn, what):
        if path.name == name:
            calls["n"] += 1
            if calls["n"] == nth:
                def partial(fh):
                    fh.write(b"x" * 100)
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(path, partial, what)
        return real(path, fn, what)

    monkeypatch.setattr(checkpoint, "_write_atomically", write)


def test_disk_full_keeps_the_previous_checkpoint_and_stops_in_one_line(small_cfg, tmp_path,
                                                                         monkeypatch):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=3, max_steps=2)
    out = tmp_path / "r"
    _enospc_on(monkeypatch, "last.pt", nth=2)  # epoch 2's checkpoint
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last.pt.*no space left "
                                              r"on device; the previous version .* is kept"):
        train(from_dict(cfg), out, log=lambda s: None)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    monkeypatch.undo()
    train(from_dict(cfg), out, resume=True, log=lambda s: None)
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_disk_full_at_the_first_checkpoint_then_a_fresh_start_writes_each_epoch_once(
        small_cfg, tmp_path, monkeypatch):
    """Reproduces a defect: metrics.jsonl used to be written before last.pt, so a fresh start
    after a failed first checkpoint appended epoch 1 a second time."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=2, max_steps=2)
    out = tmp_path / "r"
    _enospc_on(monkeypatch, "last.pt", nth=1)
    with pytest.raises(CheckpointError, match="no space left"):
        train(from_dict(cfg), out, log=lambda s: None)
    assert not (out / "last.pt").exists()
    monkeypatch.undo()
    train(from_dict(cfg), out, log=lambda s: None)  # a fresh start: no checkpoint to resume
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


@pytest.mark.parametrize("balancer", ["dwa", "nashmtl"])
def test_nonfinite_loss_skip_warns_naming_task_and_step(small_cfg, tmp_path, balancer):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=1, max_steps=3, on_nonfinite="skip")
    cfg["balancer"] = {"name": balancer}
    logs: list[str] = []
    t = Trainer(from_dict(cfg), tmp_path / "r", log=logs.append)
    depth_loss = t.tasks["depth"].loss
    calls = {"n": 0}

    def flaky(pred, target):
        calls["n"] += 1
        loss = depth_loss(pred, target)
        return loss * float("inf") if calls["n"] == 2 else loss  # step 2 overflows

    t.tasks["depth"].loss = flaky
    with pytest.warns(RuntimeWarning, match=r"epoch 1 step 2: non-finite loss for depth \(inf\)"):
        t.fit()
    assert any("step skipped" in line for line in logs)
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["skipped_steps"] == 1 and all(map(float.__instancecheck__,
                                                    record["train_loss"].values()))
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert all(torch.isfinite(v).all() for v in t.balancer.state_dict().values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


@pytest.mark.parametrize("balancer", ["dwa", "nashmtl"])
def test_nonfinite_loss_stop_names_task_and_step(small_cfg, tmp_path, balancer):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=1, max_steps=3)  # on_nonfinite: stop (the default)
    cfg["balancer"] = {"name": balancer}
    t = Trainer(from_dict(cfg), tmp_path / "r", log=lambda s: None)
    t.tasks["normals"].loss = lambda pred, target: pred.sum() * float("nan")
    with pytest.raises(TrainingError, match=r"epoch 1 step 1: non-finite loss for normals \(nan\)"):
        t.fit()
    assert not (tmp_path / "r" / ".lock").exists()
