"""Gradient conflict and TAG's lookahead affinity: the maths, and their logging during training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mtlcv.analysis.interactions import (
    cosine_matrix,
    lookahead_affinity,
    per_task_gradients,
    shared_named_parameters,
)
from mtlcv.config import from_dict
from mtlcv.engine.checkpoint import load_checkpoint
from mtlcv.engine.gradient_log import read_log
from mtlcv.engine.trainer import Trainer, train
from mtlcv.errors import ConfigError, Preempted


class Toy(nn.Module):
    """A shared linear layer and one linear head per task (float64, smooth)."""

    def __init__(self, T: int = 3, d: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tasks = [f"t{k}" for k in range(T)]
        self.shared = nn.Linear(d, d).double()
        self.heads = nn.ModuleList(nn.Linear(d, 1).double() for _ in range(T))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def task_parameters(self, task: str):
        return self.heads[self.tasks.index(task)].parameters()

    def forward(self, x):
        z = torch.tanh(self.shared(x))
        return {t: h(z) for t, h in zip(self.tasks, self.heads)}


def _setup(T=3, seed=0):
    torch.manual_seed(seed)
    model = Toy(T, seed=seed)
    x = torch.randn(16, 5, dtype=torch.float64)
    ys = [torch.randn(16, 1, dtype=torch.float64) for _ in range(T)]

    def losses_of(preds):
        return torch.stack([((preds[t] - y) ** 2).mean() for t, y in zip(model.tasks, ys)])

    named = shared_named_parameters(model)
    params = [p for _, p in named]

    def loss_at(values):
        subs = dict(zip([n for n, _ in named], values))
        return losses_of(torch.func.functional_call(model, subs, (x,)))

    return model, x, losses_of, params, loss_at


def test_cosine_matrix_values_and_undefined_rows():
    G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0], [0.0, 0.0]])
    C = cosine_matrix(G)
    assert C.dtype == torch.float64
    assert C[0, 1].item() == pytest.approx(2**-0.5)
    assert C[0, 2].item() == pytest.approx(-1.0)  # scale-free: -2 g is opposite to g
    assert torch.allclose(C[:3, :3], C[:3, :3].T)
    assert torch.isnan(C[3]).all() and torch.isnan(C[:, 3]).all()  # no direction, no made-up 0


def test_shared_parameters_are_the_ones_balancers_see():
    model = Toy()
    names = [n for n, _ in shared_named_parameters(model)]
    assert names == ["shared.weight", "shared.bias"]


def test_affinity_is_the_loss_change_of_eq_2_exactly():
    model, x, losses_of, params, loss_at = _setup()
    losses = losses_of(model(x))
    G = per_task_gradients(losses, params)
    lr = 0.05
    Z = lookahead_affinity(loss_at, params, G, losses.detach(), lr)
    # by hand: step the shared weights on task i's loss alone, heads unchanged
    for i in range(3):
        m = copy.deepcopy(model)
        gi = torch.autograd.grad(losses_of(m(x))[i], list(m.shared.parameters()))
        with torch.no_grad():
            for p, g in zip(m.shared.parameters(), gi):
                p -= lr * g
            after = losses_of(m(x))
        expect = 1 - after / losses.detach()
        assert torch.allclose(Z[i], expect, rtol=1e-10, atol=1e-12)


def test_affinity_tends_to_the_first_order_dot_product():
    """Z_{i->j} / eta -> <g_i, g_j> / L_j as eta -> 0 (Taylor expansion of Eq. 2)."""
    model, x, losses_of, params, loss_at = _setup(seed=1)
    losses = losses_of(model(x))
    G = per_task_gradients(losses, params)
    first = (G @ G.T) / losses.detach()[None, :]
    errs = []
    for lr in (1e-2, 1e-3, 1e-4):
        Z = lookahead_affinity(loss_at, params, G, losses.detach(), lr)
        errs.append((Z / lr - first).abs().max().item())
    assert errs[2] < errs[1] < errs[0]  # the error shrinks linearly with eta
    assert errs[2] < 1e-3 * first.abs().max().item()


def test_a_task_that_pulls_against_another_has_negative_affinity():
    """Two tasks with opposite targets through one shared scalar: a step on one hurts the other."""
    w = nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    x = torch.tensor([1.0], dtype=torch.float64)

    def losses_of_w(v):
        return torch.stack([((v * x - 1) ** 2).sum(), ((v * x + 1) ** 2).sum(),
                            ((v * x - 2) ** 2).sum()])

    losses = losses_of_w(w)
    G = per_task_gradients(losses, [w])
    Z = lookahead_affinity(lambda vs: losses_of_w(vs[0]), [w], G, losses.detach(), 0.01)
    C = cosine_matrix(G)
    assert C[0, 1] < 0 and Z[0, 1] < 0 and Z[1, 0] < 0  # opposite pulls hurt each other
    assert C[0, 2] > 0 and Z[0, 2] > 0 and Z[2, 0] > 0  # same direction helps
    assert (torch.diagonal(Z) > 0).all()  # a small step on a task lowers its own loss


def test_no_shared_parameters_give_an_empty_matrix():
    losses = torch.ones(2, requires_grad=True) * 1.0
    assert per_task_gradients(losses, []).shape == (2, 0)


# ---------------------------------------------------------------------- during training
def _cfg(small_cfg, **train):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update({"epochs": 2, "max_steps": 3, **train})
    return cfg


def test_logging_does_not_change_training_and_writes_one_record_per_logged_step(
    small_cfg, tmp_path
):
    plain = _cfg(small_cfg)
    logged = _cfg(small_cfg, log_gradients_every=2)
    train(from_dict(plain), tmp_path / "plain", log=lambda s: None)
    train(from_dict(logged), tmp_path / "logged", log=lambda s: None)
    a = load_checkpoint(tmp_path / "plain" / "last.pt")
    b = load_checkpoint(tmp_path / "logged" / "last.pt")
    for k in a["model"]:  # weights, batch-norm statistics included
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not (tmp_path / "plain" / "gradients.jsonl").exists()
    recs = read_log(tmp_path / "logged" / "gradients.jsonl")
    # 3 steps per epoch, 2 epochs: global steps 0..5, logged every 2
    assert [r["global_step"] for r in recs] == [0, 2, 4]
    assert [(r["epoch"], r["step"]) for r in recs] == [(1, 1), (1, 3), (2, 2)]
    for r in recs:
        C, Z = torch.tensor(r["cosine"]), torch.tensor(r["affinity"])
        assert C.shape == Z.shape == (3, 3)
        assert torch.allclose(torch.diagonal(C), torch.ones(3, dtype=C.dtype))
        assert torch.isfinite(Z).all() and r["tasks"] == ["semseg", "depth", "normals"]
        assert r["shared_parameters"] > 0 and r["lr"] > 0


@pytest.mark.parametrize(
    "arch,balancer",
    [("mtan", "pcgrad"), ("cross_stitch", "uncertainty"), ("padnet", "gradnorm"),
     ("hps", "mgda-ub")],
)
def test_logging_works_for_any_architecture_and_balancer(small_cfg, tmp_path, arch, balancer):
    cfg = _cfg(small_cfg, log_gradients_every=2, epochs=1)
    cfg["model"]["arch"] = arch
    cfg["balancer"] = {"name": balancer}
    plain = copy.deepcopy(cfg)
    del plain["train"]["log_gradients_every"]
    train(from_dict(plain), tmp_path / "plain", log=lambda s: None)
    train(from_dict(cfg), tmp_path / "logged", log=lambda s: None)
    a = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "logged" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = read_log(tmp_path / "logged" / "gradients.jsonl")
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["cosine"])).all() for r in recs)


def test_a_model_without_shared_parameters_logs_nothing_and_says_so(small_cfg, tmp_path):
    cfg = _cfg(small_cfg, log_gradients_every=1, epochs=1)
    cfg["model"]["arch"] = "stl"
    lines = []
    train(from_dict(cfg), tmp_path / "run", log=lines.append)
    assert not (tmp_path / "run" / "gradients.jsonl").exists()
    assert sum("no shared parameters" in x for x in lines) == 1


def test_resumed_run_logs_exactly_what_an_uninterrupted_one_logs(small_cfg, tmp_path):
    cfg = _cfg(small_cfg, log_gradients_every=2, epochs=3)
    train(from_dict(cfg), tmp_path / "full", log=lambda s: None)
    Trainer(from_dict(cfg), tmp_path / "cut", log=lambda s: None).fit(stop_after_epoch=2)
    # a crash after the log was flushed but before the checkpoint: a stale epoch-3 line
    path = tmp_path / "cut" / "gradients.jsonl"
    lines = path.read_text().splitlines()
    stale = {**json.loads(lines[-1]), "epoch": 3, "global_step": 10**6}
    path.write_text("\n".join([*lines, json.dumps(stale)]) + "\n")
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ckpt["epoch"] == 2
    train(from_dict(cfg), tmp_path / "cut", resume=True, log=lambda s: None)
    full = (tmp_path / "full" / "gradients.jsonl").read_text()
    assert (tmp_path / "cut" / "gradients.jsonl").read_text() == full


def test_a_run_resumed_mid_epoch_logs_exactly_what_an_uninterrupted_one_logs(small_cfg, tmp_path):
    """With ``train.checkpoint_every``: stopped mid-epoch and resumed, the log holds every logged
    step once, as the uninterrupted run's."""
    cfg = _cfg(small_cfg, log_gradients_every=2, epochs=2)
    cfg["train"].update(max_steps=5, checkpoint_every=3)
    train(from_dict(cfg), tmp_path / "full", log=lambda s: None)
    t = Trainer(from_dict(cfg), tmp_path / "cut", log=lambda s: None)
    step = t.train_step

    def stop_after_7(batch):
        out = step(batch)
        if t.global_step == 6:  # the 7th step: epoch 2, step 2 (checkpoint after step 6)
            t.request_stop("a test")
        return out

    t.train_step = stop_after_7
    with pytest.raises(Preempted):
        t.fit()
    logged = read_log(tmp_path / "cut" / "gradients.jsonl")
    assert [r["global_step"] for r in logged] == [0, 2, 4, 6]
    train(from_dict(cfg), tmp_path / "cut", resume=True, log=lambda s: None)
    full = (tmp_path / "full" / "gradients.jsonl").read_text()
    assert (tmp_path / "cut" / "gradients.jsonl").read_text() == full


def test_bad_schedule_is_a_config_error(small_cfg):
    with pytest.raises(ConfigError, match="train.log_gradients_every"):
        from_dict(_cfg(small_cfg, log_gradients_every=0))


def test_a_run_cut_before_its_first_checkpoint_starts_its_logs_afresh(small_cfg, tmp_path):
    """Ctrl-C between the first metrics line and the first last.pt: the rerun starts fresh and
    must not keep the stale lines (each epoch is logged once)."""
    cfg = _cfg(small_cfg, log_gradients_every=2, epochs=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "stale": true}\n')
    (run / "gradients.jsonl").write_text('{"epoch": 1, "stale": true}\n')
    train(from_dict(cfg), run, log=lambda s: None)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1] and "stale" not in lines[0]
    assert all("stale" not in r for r in read_log(run / "gradients.jsonl"))

