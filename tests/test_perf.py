"""Speed options of the training step (issue 14): no host-device sync in the step, mixed
precision for every balancer (bf16 finite steps, fp16 unscaled per-task gradients, overflow
skipped alike, bitwise resume), loader options."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from mtlcv.config import from_dict
from mtlcv.engine.checkpoint import load_checkpoint
from mtlcv.engine.trainer import Trainer, train
from mtlcv.errors import ConfigError
from mtlcv.registry import BALANCERS


def _trainer(cfg: dict, tmp_path, name: str = "run") -> Trainer:
    return Trainer(from_dict(cfg), tmp_path / name, log=lambda s: None)


def _batch(tr: Trainer) -> dict:
    return next(iter(tr.train_loader()))


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def test_the_step_reads_nothing_back_but_the_finiteness_check(small_cfg, tmp_path, monkeypatch):
    """Every Python-level read of a tensor's value (what synchronises host and device on a GPU)
    during an equal-weights step, the batch check on the host excepted: only the one that
    ``train.on_nonfinite`` needs is left."""
    tr = _trainer(small_cfg, tmp_path)
    batch = _batch(tr)
    calls: list[str] = []
    import mtlcv.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "check_batch", lambda b, t: None)
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            # mtlcv's own reads (torch's optimizers read their CPU step counters, no device)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("mtlcv"):
                calls.append(f"{_name} in {caller}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    out = tr.train_step(batch)
    monkeypatch.undo()
    assert out is not None
    # torch.isfinite(losses).all(), for train.on_nonfinite
    assert calls == ["__bool__ in mtlcv.engine.trainer"], calls
    tr.close()


@pytest.mark.slow
def test_every_balancer_takes_a_finite_bf16_step(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["amp"] = "bf16"
    failed = []
    for i, name in enumerate(BALANCERS.names()):
        cfg["balancer"] = {"name": name}
        tr = _trainer(cfg, tmp_path, f"r{i}")
        before = [p.detach().clone() for p in tr.model.parameters()]
        out = tr.train_step(_batch(tr))
        after = list(tr.model.parameters())
        finite = all(torch.isfinite(p).all() for p in after)
        moved = any(not torch.equal(a, b) for a, b in zip(after, before))
        if out is None or not finite or not moved or not torch.isfinite(out[0]).all():
            failed.append(name)
        tr.close()
    assert failed == []


def _grads_at_scale(cfg: dict, tmp_path, scale: float, tag: str) -> list[torch.Tensor]:
    tr = _trainer(cfg, tmp_path, tag)
    tr.amp.scale = scale
    grads: list[torch.Tensor] = []
    tr.optimizer.step = lambda: grads.extend(  # type: ignore[method-assign]
        p.grad.clone() for p in tr.model.parameters() if p.grad is not None)
    assert tr.train_step(_batch(tr)) is not None
    tr.close()
    return grads


@pytest.mark.parametrize("name", ["fixed", "nashmtl", "upgrad", "mgda-ub", "uncertainty"])
def test_fp16_balancers_see_unscaled_gradients(small_cfg, tmp_path, name):
    """The update does not depend on the loss scale: were the per-task gradients handed to the
    balancer scaled, Nash-MTL's (scale-free) update would come out 2^9 times too small after
    unscaling, and the others 2^9 times too large without it."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["amp"] = "fp16"
    cfg["balancer"] = {"name": name}
    a = _grads_at_scale(cfg, tmp_path, 1.0, "a")
    b = _grads_at_scale(cfg, tmp_path, 2.0**9, "b")
    na = torch.cat([g.flatten() for g in a]).norm()
    nb = torch.cat([g.flatten() for g in b]).norm()
    assert torch.isfinite(na) and na > 0
    assert nb / na == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("name", ["fixed", "nashmtl"])
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(small_cfg, tmp_path, name):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["amp"] = "fp16"
    cfg["balancer"] = {"name": name}
    tr = _trainer(cfg, tmp_path)
    tr.amp.scale = 2.0**120  # the float16 backward overflows
    before = [p.detach().clone() for p in tr.model.parameters()]
    assert tr.train_step(_batch(tr)) is None
    assert all(torch.equal(p, b) for p, b in zip(tr.model.parameters(), before))
    assert tr.amp.scale == 2.0**119 and tr.amp.skipped == 1
    tr.close()


def test_fp16_resume_is_bitwise_with_the_scale(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["amp"] = "fp16"
    cfg["train"]["checkpoint_every"] = 5
    train(from_dict(cfg), tmp_path / "full", log=lambda s: None)
    Trainer(from_dict(cfg), tmp_path / "cut", log=lambda s: None).fit(stop_after_epoch=1)
    train(from_dict(cfg), tmp_path / "cut", resume=True, log=lambda s: None)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["amp"] == b["amp"] and a["amp"]["mode"] == "fp16"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_amp_and_layout_options_are_checked_and_run(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"]["amp"] = "fp8"
    with pytest.raises(ConfigError, match=r"'train.amp': got 'fp8', expected one of off, bf16"):
        from_dict(cfg)
    cfg["train"]["amp"] = "off"
    cfg["train"]["channels_last"] = True
    tr = _trainer(cfg, tmp_path)
    conv = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert tr.train_step(_batch(tr)) is not None
    tr.close()


def test_eval_loaders_keep_their_workers(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["data"]["num_workers"] = 1
    tr = _trainer(cfg, tmp_path)
    assert tr.val_loader.persistent_workers and not tr.train_loader().persistent_workers
    assert not tr.val_loader.pin_memory  # CPU training: nothing to pin for
    tr.close()


def test_cli_sets_a_passive_omp_wait_policy_before_torch_is_imported(monkeypatch, capsys):
    import subprocess

    from mtlcv.cli import main

    # the policy only takes effect if torch is not imported before main() runs
    code = "import sys, mtlcv.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["config", "keys"]) == 0
    import os

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    assert main(["config", "keys"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()
