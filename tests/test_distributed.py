"""Data parallelism through torchrun on CPU (gloo, 2 processes).

One launch trains seven balancers (equal weights, PCGrad, MGDA, Nash-MTL, MGDA-UB in "rep" mode,
FAMO with its same-batch closure, SI) with 2 processes x batch 2 on data where the processes
hold different numbers of valid pixels; each is compared with one process x batch 4: the same
weights (within 1e-5), the same metrics, identical parameters and balancer state on both
processes, the test metrics reduced exactly, and a run directory written by rank 0 alone. The
same launch runs the published evaluation protocol (batch means merged exactly, last-epochs
test average) and detection + depth (boxes through the sampler, augmentation and collate; mAP
merged exactly). A second launch runs the console script under ``torchrun --max-restarts 1``
with FAMO and one worker SIGKILLed mid-epoch: the restarted workers resume by themselves and
end bitwise where the uninterrupted run ended.
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

import ddp_worker  # registers test-masked-scenes
from mtlcv.config import from_dict
from mtlcv.engine import distributed
from mtlcv.engine.checkpoint import load_checkpoint
from mtlcv.engine.trainer import Trainer

# mgda-ub: "rep" mode; famo: its same-batch closure after every step; si: weights 1 / L_t
METHODS = ("fixed", "pcgrad", "mgda", "nashmtl", "mgda-ub", "famo", "si")
#: runs of the same launch that change more than the balancer (ddp_worker.variant)
VARIANTS = {
    # batch means of depth and normals over evaluation batches of 2, the last 2 epochs' test
    "published": {"eval": {"protocol": "published", "last_epochs": 2},
                  "data": {"eval_batch_size": 2}},
    # boxes through the sharded sampler, the per-sample flips and the collate
    "detection": {"tasks": ["detection", "depth"], "data": {"augment": True}},
}
RUNS = (*METHODS, *VARIANTS)
HOOKS = Path(__file__).parent / "fault_hooks"
WORKER = Path(__file__).parent / "ddp_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _cfg(scenes_root: str, batch: int) -> dict:
    return {
        "variants": VARIANTS,
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
    _torchrun(str(WORKER), str(tmp / "cfg.json"), str(tmp / "runs"), *RUNS, env=_env())
    return tmp / "runs"


@pytest.fixture(scope="module")
def single_runs(scenes_root, tmp_path_factory):
    """Each method (and variant) trained by 1 process x batch 4."""
    tmp = tmp_path_factory.mktemp("single")
    out = {}
    for name in RUNS:
        cfg = from_dict(ddp_worker.variant(_cfg(scenes_root, 4), name))
        t = Trainer(cfg, tmp / name, log=lambda s: None)
        results = t.fit()
        out[name] = (t, results)
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(
        (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", [*METHODS, "published"])
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
@pytest.mark.parametrize("method", RUNS)
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
    if method == "famo":  # the same-batch closure moved the logits alike on both processes
        assert not torch.equal(r0["balancer"]["logits"], torch.zeros(3, dtype=torch.float64))
        assert int(r0["balancer"]["adam_steps"]) == 4  # one logit update per step


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


def _evaluate(single_runs, name: str, checkpoint: Path, protocol: str = "exact") -> dict:
    """One process scoring ``checkpoint``'s model over the whole test split."""
    import copy

    from mtlcv.engine.evaluate import evaluate

    t, _ = single_runs[name]
    model = copy.deepcopy(t.model)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return evaluate(model, t.tasks, t.test_loader, t.device, protocol)


@pytest.mark.slow
def test_published_protocol_merges_exactly_across_processes(ddp_runs, single_runs):
    """The batch means of the 2-process run's last test evaluation equal one process's batch
    means of the same model bit for bit (the processes scored whole batches, merged in order),
    and results.json holds the mean of the last 2 epochs' test metrics."""
    run = ddp_runs / "published"
    results = json.loads((run / "results.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert results["protocol"]["epochs_averaged"] == [1, 2]
    assert results["protocol"]["aggregation"]["depth"] == "batch_mean"
    assert _evaluate(single_runs, "published", run / "last.pt", "published") == lines[-1]["test"]
    for task, ms in results["test"].items():
        for m, v in ms.items():
            mean = (lines[0]["test"][task][m] + lines[1]["test"][task][m]) / 2
            assert v == pytest.approx(mean, rel=1e-12), (task, m)


@pytest.mark.slow
def test_detection_on_two_processes(ddp_runs, single_runs):
    """Detection + depth with augmentation: boxes go through the sharded sampler, the per-sample
    flips and the collate; mAP over the processes' merged detections equals one process scoring
    the same checkpoint; training follows one process x batch 4 closely (the IoU term's
    normaliser, the positives' centerness, is combined by positive count: close, not exact)."""
    run = ddp_runs / "detection"
    results = json.loads((run / "results.json").read_text())
    ref = _evaluate(single_runs, "detection", run / "best.pt")
    assert results["test"]["detection"] == ref["detection"]
    for m, v in ref["depth"].items():
        assert results["test"]["depth"][m] == pytest.approx(v, rel=1e-12), m
    t, _ = single_runs["detection"]
    diff = _max_diff(t.model.state_dict(), load_checkpoint(run / "last.pt")["model"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"detection: max |w_2x2 - w_1x4| = {diff:.3g}; train losses "
          f"{[x['train_loss'] for x in lines]} vs {[h['train_loss'] for h in t.history]}")
    assert diff < 2e-2  # measured 4.8e-3 after 4 SGD steps (lr 0.05, momentum 0.9)
    for rec, h in zip(lines, t.history):
        assert rec["train_loss"]["detection"] == pytest.approx(h["train_loss"]["detection"],
                                                               rel=1e-2)
    # depth's loss is combined exactly: equal while the weights are (nearly) the same
    assert lines[0]["train_loss"]["depth"] == pytest.approx(t.history[0]["train_loss"]["depth"],
                                                            rel=1e-5)


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_directory(ddp_runs):
    for method in RUNS:
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
    """The console script under ``torchrun --max-restarts 1``, with FAMO (a stateful balancer
    whose same-batch closure runs after every step): rank 1 is SIGKILLed before its 4th step;
    the agent restarts both workers, which resume from the mid-epoch checkpoint of step 3 by
    themselves and end with the weights and FAMO state of the uninterrupted run, bitwise."""
    cfg = dict(_cfg(scenes_root, 2), balancer={"name": "famo"})
    del cfg["variants"]
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
    got, ref = load_checkpoint(out / "last.pt"), load_checkpoint(ddp_runs / "famo" / "last.pt")
    for part in ("model", "balancer"):
        for k in ref[part]:
            assert torch.equal(got[part][k], ref[part][k]), (part, k)
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


@pytest.mark.parametrize("dataset", ["scenes", "multidigits", "scenes-objects"])
def test_per_sample_augmentation_with_boxes_and_every_augmenting_dataset(scenes_root, dataset):
    """The sharded loader gives every sample the augmentation of (seed, epoch, index), whatever
    the number of processes or the resume point: the scenes with their detection boxes (flipped
    with the image, padded by the collate), MultiDigits' translations and the scenes' object
    crops; the global random stream is left untouched."""
    from mtlcv.engine.experiment import make_loader
    from mtlcv.registry import DATASETS

    opts = {"n": 48, "size": [32, 48], "seed": 0}
    if dataset == "multidigits":
        ds = DATASETS.create(dataset, split="train", augment=True, n=40)
    else:
        ds = DATASETS.create(dataset, split="train", root=scenes_root, augment=True, **opts)
    task = "left" if dataset == "multidigits" else "classification"

    def items(batch_size, epoch, world=1, rank=0, start=0, limit=2):
        cfg = from_dict({"tasks": [task], "data": {"name": dataset, "batch_size": batch_size},
                         "seed": 5})
        loader = make_loader(cfg, ds, True, seed=cfg.seed + epoch, epoch=epoch, start=start,
                             rank=rank, world=world)
        out = {}
        for k, (idx, batch) in enumerate(zip(loader.batch_sampler, loader)):
            if k == limit:
                break
            for j, i in enumerate(idx):
                row = {key: v[j] for key, v in batch.items()}
                if "detection" in row:  # the sample's boxes, without the batch's padding
                    row["detection"] = row["detection"][row["detection"][:, 4] >= 0]
                out[i] = row
        return out

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    state = torch.get_rng_state()
    one = items(6, epoch=1)
    two = {**items(3, epoch=1, world=2, rank=0), **items(3, epoch=1, world=2, rank=1)}
    resumed = items(6, epoch=1, start=1, limit=1)
    other_epoch = items(6, epoch=2, limit=20)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(one) == 12 and one.keys() == two.keys()
    assert all(same(one[i], two[i]) for i in one)
    assert resumed and all(same(one[i], resumed[i]) for i in resumed)
    # the augmentation is drawn (another epoch gives some sample another version)
    common = [i for i in one if i in other_epoch]
    assert common and any(not torch.equal(one[i]["image"], other_epoch[i]["image"])
                          for i in common)
    if dataset == "scenes":
        assert any(len(one[i]["detection"]) for i in one)
        flips = 0
        for i in one:  # boxes moved with the image: flipped exactly when the image is
            raw = ds.boxes(i).boxes
            got = one[i]["detection"][:, :4]
            mirrored = torch.stack([48 - raw[:, 2], raw[:, 1], 48 - raw[:, 0], raw[:, 3]], 1)
            flipped = torch.equal(one[i]["image"], ds.arrays["image"][i].float().flip(-1) / 255)
            assert torch.equal(got, mirrored if flipped else raw), i
            flips += flipped
        assert 0 < flips < len(one)
