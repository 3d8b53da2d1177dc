"""Evaluation protocols (engine/protocol.py): the exact split-level metrics and the papers'
published protocol (batch means of depth and normals metrics, last-epochs test average), each
checked against a hand computation on the real NYUv2 fixture frames; the protocol recorded in
results.json; Δm refused between protocols unless the user allows it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from mtlcv.config import from_dict
from mtlcv.engine.evaluate import evaluate
from mtlcv.engine.trainer import Trainer, train
from mtlcv.errors import ConfigError
from mtlcv.registry import DATASETS, TASKS

FIXTURE = Path(__file__).resolve().parents[2] / "shared/data/nyuv2-fixture"
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "nyuv2_mini_real.npz").is_file(),
    reason=f"real NYUv2 fixture not found at {FIXTURE} (shared/data is not checked out here)",
)


class ImageFunctions(nn.Module):
    """A fixed 'model': every prediction is a deterministic function of the image alone."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.seg = nn.Conv2d(3, 13, 3, padding=1)
        with torch.no_grad():
            self.seg.weight.copy_(torch.randn(13, 3, 3, 3, generator=g))
            self.seg.bias.copy_(torch.randn(13, generator=g))

    def forward(self, x):
        depth = 1.0 + 4.0 * x.mean(1, keepdim=True) + x[:, :1] ** 2
        normals = torch.stack([x[:, 0] - 0.5, x[:, 1] - 0.4, -(0.3 + x[:, 2])], 1)
        return {"semseg": self.seg(x), "depth": depth, "normals": normals}


def hand_metrics(batches: list[dict[str, np.ndarray]], per_batch: bool) -> dict:
    """The papers' formulas written out with NumPy (mtan's utils.py: depth_error, normal_error,
    ConfMatrix): on the whole split (``per_batch=False``) or per batch, then the mean over the
    batches that have valid pixels (``per_batch=True``); segmentation is split-level in both."""

    def depth(bs):
        p = np.concatenate([b["pd"][b["td"] > 0] for b in bs]).astype(np.float64)
        t = np.concatenate([b["td"][b["td"] > 0] for b in bs]).astype(np.float64)
        if t.size == 0:
            return None
        return {"abs_err": np.abs(p - t).mean(), "rel_err": (np.abs(p - t) / t).mean()}

    def normals(bs):
        ang = []
        for b in bs:
            valid = np.linalg.norm(b["tn"], axis=1) > 0  # [B, H, W]
            p = b["pn"] / np.linalg.norm(b["pn"], axis=1, keepdims=True)
            cos = np.clip((p * b["tn"]).sum(1), -1, 1)
            ang.append(np.degrees(np.arccos(cos.astype(np.float64)))[valid])
        a = np.concatenate(ang)
        if a.size == 0:
            return None
        return {"mean": a.mean(), "median": np.median(a), "within_11.25": 100 * (a < 11.25).mean(),
                "within_22.5": 100 * (a < 22.5).mean(), "within_30": 100 * (a < 30).mean()}

    def average(fn):
        if not per_batch:
            return fn(batches)
        vals = [v for v in (fn([b]) for b in batches) if v is not None]
        return {k: np.mean([v[k] for v in vals]) for k in vals[0]}

    cm = np.zeros((13, 13), dtype=np.int64)
    for b in batches:
        valid = b["ts"] != 255
        cm += np.bincount(13 * b["ts"][valid] + b["ps"][valid], minlength=169).reshape(13, 13)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    seg = {"miou": 100 * (tp[union > 0] / union[union > 0]).mean(),
           "pixel_acc": 100 * tp.sum() / cm.sum()}
    return {"semseg": seg, "depth": average(depth), "normals": average(normals)}


@pytest.fixture(scope="module")
def fixture_batches():
    """The fixture's 18 real test frames in batches of 2 (the papers' test batch size), in an
    order where batches hold 2, 1 or 0 frames with depth (the in-painted depth is valid at every
    pixel, so batches of equal counts would hide the difference between the aggregations)."""
    if not (FIXTURE / "nyuv2_mini_real.npz").is_file():
        pytest.skip(f"real NYUv2 fixture not found at {FIXTURE}")
    ds = DATASETS.create("nyuv2-fixture", split="test", root=str(FIXTURE), derived_normals=True)
    d = [i for i in range(len(ds)) if ds.has["depth"][i]]
    n = [i for i in range(len(ds)) if not ds.has["depth"][i]]
    order = [d[0], d[1], d[2], n[0], d[3], n[1], d[4], d[5], d[6], n[2], d[7], *n[3:]]
    return list(DataLoader(Subset(ds, order), batch_size=2, shuffle=False))


@needs_fixture
@pytest.mark.parametrize("protocol", ["exact", "published"])
def test_both_aggregations_match_a_hand_computation_on_real_frames(protocol, fixture_batches):
    tasks = {n: TASKS.create(n) for n in ("semseg", "depth", "normals")}
    for n, t in tasks.items():
        t.name = n
    model = ImageFunctions().eval()
    got = evaluate(model, tasks, fixture_batches, torch.device("cpu"), protocol)
    batches = []
    with torch.no_grad():
        for b in fixture_batches:
            out = model(b["image"])
            batches.append({
                "ps": out["semseg"].argmax(1).numpy(), "ts": b["semseg"].numpy(),
                "pd": out["depth"].numpy(), "td": b["depth"].numpy(),
                "pn": out["normals"].numpy(), "tn": b["normals"].numpy(),
            })
    # 9 batches, of which some have no depth at all (skipped by the batch means)
    assert len(batches) == 9 and any((b["td"] > 0).sum() == 0 for b in batches)
    want = hand_metrics(batches, per_batch=protocol == "published")
    for task, ms in want.items():
        for m, v in ms.items():
            assert got[task][m] == pytest.approx(v, rel=2e-5), (task, m)
    other = hand_metrics(batches, per_batch=protocol != "published")
    # the two aggregations really differ on these frames (the test can tell them apart)
    assert abs(other["depth"]["abs_err"] - got["depth"]["abs_err"]) > 1e-3
    assert abs(other["normals"]["median"] - got["normals"]["median"]) > 1e-2


def test_published_protocol_reports_the_mean_of_the_last_epochs(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=3, max_steps=2, threads=1)
    cfg["data"]["eval_batch_size"] = 2
    cfg["eval"] = {"protocol": "published", "last_epochs": 2}
    results = train(from_dict(cfg), tmp_path / "run", log=lambda s: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["test" in x for x in lines] == [False, True, True]
    for split in ("test", "val"):
        for task, ms in results[split].items():
            for m, v in ms.items():
                mean = (lines[1][split][task][m] + lines[2][split][task][m]) / 2
                assert v == pytest.approx(mean, rel=1e-12), (split, task, m)
    p = results["protocol"]
    assert p["name"] == "published" and p["epochs_averaged"] == [2, 3]
    assert p["aggregation"] == {"semseg": "split", "depth": "batch_mean", "normals": "batch_mean"}
    assert p["eval_batch_size"] == 2
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["protocol"] == p and saved["test"] == results["test"]


def test_exact_protocol_is_the_default_and_recorded(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=1, max_steps=2, threads=1)
    results = train(from_dict(cfg), tmp_path / "run", log=lambda s: None)
    assert results["protocol"]["name"] == "exact"
    assert set(results["protocol"]["aggregation"].values()) == {"split"}


def test_delta_m_between_protocols_is_refused_unless_allowed(small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg["baselines"] = "nyuv2-segnet-stl"  # the papers' numbers: published protocol
    with pytest.raises(ConfigError, match="published evaluation protocol but this run uses "
                                          "eval.protocol: exact") as exc:
        Trainer(from_dict(cfg), tmp_path / "a", log=lambda s: None)
    assert "\n" not in str(exc.value) and "allow_protocol_mismatch" in str(exc.value)
    cfg["eval"] = {"protocol": "published"}
    Trainer(from_dict(cfg), tmp_path / "b", log=lambda s: None)  # same protocol: fine
    cfg["eval"] = {"protocol": "exact", "allow_protocol_mismatch": True}
    Trainer(from_dict(cfg), tmp_path / "c", log=lambda s: None)  # the user said so
    # a run directory as baseline: its results.json says which protocol made it
    base = copy.deepcopy(small_cfg)
    base["train"].update(epochs=1, max_steps=2, threads=1)
    train(from_dict(base), tmp_path / "stl", log=lambda s: None)
    cfg = copy.deepcopy(small_cfg)
    cfg["baselines"] = str(tmp_path / "stl")
    cfg["eval"] = {"protocol": "published"}
    with pytest.raises(ConfigError, match="exact evaluation protocol"):
        Trainer(from_dict(cfg), tmp_path / "d", log=lambda s: None)
    with pytest.raises(ConfigError, match="eval.protocol"):
        from_dict({**small_cfg, "eval": {"protocol": "paper"}})


# ---------------------------------------------------------------------- several processes
def test_batch_means_merge_across_processes_exactly():
    """The published protocol's batch means carry their per-batch values: contiguous runs of
    batches scored apart and merged in rank order (pickled, as gathered) give one process's
    numbers bit for bit, batches without valid pixels skipped alike."""
    import pickle

    from mtlcv.engine.protocol import new_metric

    g = torch.Generator().manual_seed(0)
    batches = []
    for k in range(5):
        depth = torch.rand(2, 1, 6, 8, generator=g) + 0.5
        normals = torch.nn.functional.normalize(torch.randn(2, 3, 6, 8, generator=g), dim=1)
        if k == 3:  # no valid pixel: NaN, left out of the mean
            depth, normals = torch.zeros_like(depth), torch.zeros_like(normals)
        batches.append({"depth": (torch.rand(2, 1, 6, 8, generator=g) + 0.5, depth),
                        "normals": (torch.randn(2, 3, 6, 8, generator=g), normals)})
    for name in ("depth", "normals"):
        task = TASKS.create(name)
        whole = new_metric(task, "published")
        parts = [new_metric(task, "published") for _ in range(3)]
        for k, b in enumerate(batches):
            whole.update(*b[name])
            parts[0 if k < 2 else 1 if k < 4 else 2].update(*b[name])  # runs of 2, 2, 1
        for other in parts[1:]:
            parts[0].merge(pickle.loads(pickle.dumps(other.state())))
        assert parts[0].compute() == whole.compute(), name
        # and the batch mean is not the split-level value (the merge kept the batches)
        exact = task.new_metric()
        for b in batches:
            exact.update(*b[name])
        assert parts[0].compute() != exact.compute()


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shards_are_contiguous_runs_of_one_process_batches(small_cfg, world):
    """With several processes each evaluates a contiguous run of the batches one process forms
    (so batch means and merge order are one process's); every sample exactly once."""
    from mtlcv.engine.experiment import make_loader

    cfg = copy.deepcopy(small_cfg)
    cfg["data"]["eval_batch_size"] = 2
    ds = [{"image": torch.full((3, 2, 2), float(i))} for i in range(7)]
    one = [b["image"][:, 0, 0, 0].tolist() for b in make_loader(from_dict(cfg), ds, False)]
    shards = [[b["image"][:, 0, 0, 0].tolist()
               for b in make_loader(from_dict(cfg), ds, False, rank=r, world=world)]
              for r in range(world)]
    assert one == [[0, 1], [2, 3], [4, 5], [6]]
    assert [b for s in shards for b in s] == one
    assert all(s for s in shards)  # 4 batches over 2 or 3 processes: none idle


def test_published_protocol_refuses_a_resume_whose_last_epochs_were_not_tested(small_cfg,
                                                                              tmp_path):
    """Shortening a published-protocol run on resume would average epochs that ran without a
    test evaluation: refused in one line when the run is resumed, not after its training."""
    cfg = copy.deepcopy(small_cfg)
    cfg["train"].update(epochs=4, max_steps=1, threads=1)
    cfg["schedule"] = {"name": "none"}
    cfg["eval"] = {"protocol": "published", "last_epochs": 1}
    Trainer(from_dict(cfg), tmp_path / "run", log=lambda s: None).fit(stop_after_epoch=2)
    cfg["train"]["epochs"] = 2  # epoch 2 was not among the last 1 of 4: never tested
    with pytest.raises(ConfigError, match="epoch.s. 2 ran without a test evaluation") as exc:
        Trainer(from_dict(cfg), tmp_path / "run", resume=True, log=lambda s: None).fit()
    assert "\n" not in str(exc.value)
    cfg["train"]["epochs"] = 5  # longer: its last epoch is still to come, and tested
    results = train(from_dict(cfg), tmp_path / "run", resume=True, log=lambda s: None)
    assert results["protocol"]["epochs_averaged"] == [5]
