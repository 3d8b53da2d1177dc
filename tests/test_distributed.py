"""Data parallelism through torchrun on CPU (gloo, 2 processes).

One launch trains four balancers (equal weights, PCGrad, MGDA, Nash-MTL) with 2 processes x batch
2 on data where the processes hold different numbers of valid pixels; each is compared with one
process x batch 4: the same weights (within 1e-5), the same metrics, identical parameters and
balancer state on both processes, the test metrics reduced exactly, and a run directory written
by rank 0 alone. A second launch runs the console script under ``torchrun --max-restarts 1``
with one worker SIGKILLed mid-epoch: the restarted workers resume by themselves and end bitwise
where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import ddp_worker  # noqa: F401  (registers test-masked-scenes)
from mtlcv.config import from_dict
from mtlcv.engine import distributed
from mtlcv.engine.checkpoint import load_checkpoint
from mtlcv.engine.trainer import Trainer

METHODS = ("fixed", "pcgrad", "mgda", "nashmtl", "mgda-ub")  # mgda-ub: "rep" mode
HOOKS = Path(__file__).parent / "fault_hooks"
WORKER = Path(__file__).parent / "ddp_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _cfg(scenes_root: str, batch: int) -> dict:
    return {
        "name": "ddp",
        "seed": 0,
        "tasks": ["semseg", "depth", "normals"],
        "data": {
            "name": "test-masked-scenes",
            "root": scenes_root,
            "batch_size": batch,
            "options": {"n": 48, "size": [32, 48], "seed": 0},
        },
        "model": {"arch": "hps", "backbone": {"name": "tiny", "width": 8},
                  "head": {"name": "light"}},
        # SGD: an update linear in the gradient (Adam's g / sqrt(v) turns a last-digit difference
        # of a near-zero gradient into a full step of either sign)
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2, "max_steps": 2, "progress": False, "device": "cpu", "threads": 1},
    }


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTLCV_TEST_", "TORCHELASTIC"))}
    tests = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join([tests, *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun(*args: str, env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


@pytest.fixture(scope="module")
def ddp_runs(scenes_root, tmp_path_factory):
    """Each method trained by 2 processes x batch 2 (one torchrun launch)."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "cfg.json").write_text(json.dumps(_cfg(scenes_root, 2)))
    _torchrun(str(WORKER), str(tmp / "cfg.json"), str(tmp / "runs"), *METHODS, env=_env())
    return tmp / "runs"


@pytest.fixture(scope="module")
def single_runs(scenes_root, tmp_path_factory):
    """Each method trained by 1 process x batch 4."""
    tmp = tmp_path_factory.mktemp("single")
    out = {}
    for name in METHODS:
        cfg = from_dict(dict(_cfg(scenes_root, 4), balancer={"name": name}))
        t = Trainer(cfg, tmp / name, log=lambda s: None)
        results = t.fit()
        out[name] = (t, results)
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(
        (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process_with_twice_the_batch(ddp_runs, single_runs, method):
    t, single = single_runs[method]
    ddp = load_checkpoint(ddp_runs / method / "last.pt")
    one = t.model.state_dict()
    diff = _max_diff(one, ddp["model"])
    print(f"{method}: max |w_2x2 - w_1x4| = {diff:.3g}")
    assert diff < 1e-5
    # BatchNorm running statistics too: global-batch statistics on both sides
    assert any(k.endswith("running_var") for k in one)
    results = json.loads((ddp_runs / method / "results.json").read_text())
    assert results["processes"] == 2 and results["global_batch_size"] == 4
    for split in ("val", "test"):
        for task, ms in single[split].items():
            for m, v in ms.items():
                assert results[split][task][m] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, m)
    # the training losses of both epochs (global losses, from the per-process counts)
    lines = [json.loads(x) for x in (ddp_runs / method / "metrics.jsonl").read_text().splitlines()]
    for rec, ref in zip(lines, t.history):
        for task, v in ref["train_loss"].items():
            assert rec["train_loss"][task] == pytest.approx(v, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_processes_hold_identical_weights_and_balancer_state(ddp_runs, method):
    r0 = torch.load(ddp_runs / method / "rank0.pt", weights_only=True)
    r1 = torch.load(ddp_runs / method / "rank1.pt", weights_only=True)
    for part in ("model", "balancer"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    if method == "nashmtl":  # a stateful balancer: its warm-started alpha after 4 steps
        assert int(r0["balancer"]["steps"]) == 4
        assert not torch.equal(r0["balancer"]["alpha"], torch.ones(3, dtype=torch.float64))


@pytest.mark.slow
def test_split_metrics_are_reduced_exactly(ddp_runs, single_runs):
    """The test metrics of the 2-process run equal one process scoring the same checkpoint over
    the whole split: confusion-matrix and count metrics and the normals median exactly."""
    t, _ = single_runs["fixed"]
    from mtlcv.engine.evaluate import evaluate

    t.model.load_state_dict(load_checkpoint(ddp_runs / "fixed" / "best.pt")["model"])
    ref = evaluate(t.model, t.tasks, t.test_loader, t.device)
    got = json.loads((ddp_runs / "fixed" / "results.json").read_text())["test"]
    assert got["semseg"] == ref["semseg"]  # from one merged confusion matrix
    assert got["normals"]["median"] == ref["normals"]["median"]
    for k in ("within_11.25", "within_22.5", "within_30"):
        assert got["normals"][k] == ref["normals"][k]
    assert got["depth"]["delta1"] == ref["depth"]["delta1"]
    for task in ("depth", "normals"):
        for m, v in ref[task].items():
            assert got[task][m] == pytest.approx(v, rel=1e-12)


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_directory(ddp_runs):
    for method in METHODS:
        files = {p.name for p in (ddp_runs / method).iterdir()}
        assert files == {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "results.json",
                         "rank0.pt", "rank1.pt"}, files
        lines = (ddp_runs / method / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
        last = load_checkpoint(ddp_runs / method / "last.pt")
        assert last["world_size"] == 2 and len(last["rng_ranks"]) == 2


@pytest.mark.slow
def test_torchrun_restart_resumes_mid_epoch_from_the_last_checkpoint(ddp_runs, scenes_root,
                                                                     tmp_path):
    """The console script under ``torchrun --max-restarts 1``: rank 1 is SIGKILLed before its
    4th step; the agent restarts both workers, which resume from the mid-epoch checkpoint of
    step 3 by themselves and end with the weights of the uninterrupted run, bitwise."""
    cfg = dict(_cfg(scenes_root, 2), balancer={"name": "fixed"})
    cfg["train"]["checkpoint_every"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    script = Path(sys.executable).parent / "mtlcv"
    env = _env(MTLCV_TEST_KILL_AT_STEP="3", MTLCV_TEST_KILL_RANK="1",
               MTLCV_TEST_IMPORT="ddp_worker")
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), env["PYTHONPATH"]])
    out = tmp_path / "run"
    r = _torchrun("--max-restarts", "1", "--no-python", str(script), "train", "--config",
                  str(tmp_path / "c.yaml"), "--out", str(out), env=env)
    assert "resuming" in r.stdout and "step 1 of epoch 2" in r.stdout, r.stdout
    got = load_checkpoint(out / "last.pt")["model"]
    ref = load_checkpoint(ddp_runs / "fixed" / "last.pt")["model"]
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]


# ---------------------------------------------------------------------- single-process units
def test_sharded_batches_partition_the_global_batch():
    from mtlcv.engine.distributed import ShardedBatchSampler

    one = list(ShardedBatchSampler(10, 4, seed=3))
    parts = [list(ShardedBatchSampler(10, 2, seed=3, world=2, rank=r)) for r in range(2)]
    assert len(one) == 2  # drop_last: 10 // 4
    for k, batch in enumerate(one):
        assert parts[0][k] + parts[1][k] == batch
    # resuming at global batch 1 yields the same batches from there
    assert list(ShardedBatchSampler(10, 4, seed=3, start=1)) == one[1:]
    # a split smaller than the global batch is one short batch, spread over the processes
    short = [list(ShardedBatchSampler(5, 4, seed=0, world=2, rank=r)) for r in range(2)]
    assert [len(s[0]) for s in short] == [3, 2]
    assert sorted(short[0][0] + short[1][0]) == list(range(5))


def test_augmentation_depends_on_the_sample_not_on_the_order():
    from mtlcv.engine.distributed import SampleSeeded

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(())

    ds = SampleSeeded(Noisy(), seed=5, epoch=2)
    state = torch.get_rng_state()
    forward = [float(ds[i]) for i in range(4)]
    backward = [float(ds[i]) for i in reversed(range(4))][::-1]
    assert forward == backward and len(set(forward)) == 4
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    assert float(SampleSeeded(Noisy(), seed=5, epoch=3)[0]) != forward[0]


def test_metric_states_merge_to_the_whole_split():
    """Merging the states of two shards gives exactly the whole split's metrics."""
    from mtlcv.registry import TASKS

    g = torch.Generator().manual_seed(0)
    for kind in ("semseg", "depth", "normals", "edges"):
        task = TASKS.create(kind)
        c = task.channels
        preds = [torch.randn(3, c, 8, 8, generator=g) for _ in range(4)]
        if kind == "semseg":
            targets = [torch.randint(0, c, (3, 8, 8), generator=g) for _ in range(4)]
        elif kind == "edges":
            targets = [(torch.rand(3, 1, 8, 8, generator=g) > 0.7).float() for _ in range(4)]
        elif kind == "depth":
            targets = [torch.rand(3, 1, 8, 8, generator=g) + 0.5 for _ in range(4)]
        else:
            targets = [torch.nn.functional.normalize(torch.randn(3, 3, 8, 8, generator=g), dim=1)
                       for _ in range(4)]
        whole, a, b = task.new_metric(), task.new_metric(), task.new_metric()
        for i, (p, t) in enumerate(zip(preds, targets)):
            whole.update(p, t)
            (a if i % 2 else b).update(p, t)
        a.merge(b.state())
        got, ref = a.compute(), whole.compute()
        for m in ref:
            assert got[m] == pytest.approx(ref[m], rel=1e-12), (kind, m)


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") is None
    assert not distributed.active() and distributed.world_size() == 1
    assert distributed.agreed(lambda: 3) == 3
    bn = distributed.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(2)))
    ref = torch.nn.BatchNorm2d(2)
    x = torch.randn(4, 2, 3, 3)
    assert torch.allclose(bn(x), ref(x))
    assert torch.allclose(bn[0].running_var, ref.running_var)


def test_only_train_runs_under_torchrun(monkeypatch, tmp_path, capsys):
    from mtlcv.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "only `mtlcv train` runs under torchrun" in capsys.readouterr().err
