"""The balancer step contract beyond the losses (``needs`` / ``after_step``, balancing/base.py):
the trainer hands FAMO the losses of the *same* batch recomputed after ``optimizer.step()``, and
refuses a balancer that needs something it cannot provide."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlcv.balancing.famo import FAMO
from mtlcv.config import from_dict
from mtlcv.engine import closures
from mtlcv.engine.trainer import Trainer
from mtlcv.errors import ConfigError


def test_trainer_gives_famo_the_same_batch_losses_after_the_step(small_cfg, tmp_path, monkeypatch):
    cfg = copy.deepcopy(small_cfg)
    cfg["balancer"] = {"name": "famo"}
    cfg["train"].update(epochs=1, max_steps=3, threads=1)
    trainer = Trainer(from_dict(cfg), tmp_path / "run", log=lambda s: None)
    model = trainer.model
    forwards, steps = [], []

    # every forward's input and the weights it ran with
    def hook(mod, args):
        forwards.append((args[0].clone(), copy.deepcopy(mod.state_dict())))

    model.register_forward_pre_hook(hook)
    orig_weights, orig_after = FAMO.weights, FAMO.after_step

    def weights(self, losses):
        steps.append({"before": losses.detach().clone(), "logits": self.logits.clone()})
        return orig_weights(self, losses)

    def after_step(self, cl):
        def closure():  # records what FAMO's own call of the closure returns
            steps[-1]["after"] = cl["losses_after_step"]()
            return steps[-1]["after"]

        return orig_after(self, {"losses_after_step": closure})

    monkeypatch.setattr(FAMO, "weights", weights)
    monkeypatch.setattr(FAMO, "after_step", after_step)
    trainer.train_epoch()
    assert len(steps) == 3 and all("after" in s for s in steps)
    # two forwards per step: the step's own, then the closure's on the same images with the
    # weights the optimizer has just updated
    train_fwd = [f for f in forwards if f[0].shape[0] == cfg["data"]["batch_size"]]
    assert len(train_fwd) == 6
    for k in range(3):
        (x0, w0), (x1, w1) = train_fwd[2 * k], train_fwd[2 * k + 1]
        assert torch.equal(x0, x1)
        assert any(not torch.equal(w0[n], w1[n]) for n in w0 if w0[n].is_floating_point())
    # the logits move by exactly Algorithm 1's Adam step on (before, after) of each step
    ref = FAMO(3)
    for s in steps:
        torch.testing.assert_close(ref.logits, s["logits"].to(ref.logits))
        orig_weights(ref, s["before"])  # FAMO's methods are patched above: call the originals
        orig_after(ref, {"losses_after_step": lambda s=s: s["after"]})
    torch.testing.assert_close(ref.logits, trainer.balancer.logits.cpu())


def test_a_balancer_needing_an_unknown_closure_is_refused_in_one_line():
    class HeldOut:
        needs = frozenset({"held_out_losses"})

    with pytest.raises(ConfigError, match="needs held_out_losses, which this trainer does not "
                                          "provide") as exc:
        closures.check_needs(HeldOut())
    assert "\n" not in str(exc.value)
    closures.check_needs(FAMO(2))  # known need: fine


def test_balancers_without_needs_cost_nothing_after_the_step():
    class NoNeeds:
        needs = frozenset()

        def after_step(self, cl):  # pragma: no cover - must not run
            raise AssertionError("called")

    ctx = closures.StepContext({}, lambda b: torch.zeros(2))
    assert closures.after_step(NoNeeds(), ctx) == {}
    # and FAMO's next_batch variant asks for nothing
    assert closures.after_step(FAMO(2, losses_after="next_batch"), ctx) == {}
