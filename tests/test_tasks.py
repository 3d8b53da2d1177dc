"""Tasks: streaming metrics equal a direct NumPy computation over the whole split, whatever the
batch size and order; losses mask what they must; target checks name the shapes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlcv.errors import ConfigError, DataError
from mtlcv.registry import TASKS
from mtlcv.tasks.normals import exact_median

N, H, W, C = 13, 5, 6, 5  # a "split" of 13 images
TASK_NAMES = ["semseg", "depth", "normals", "edges", "classification"]


def make_task(name: str):
    opts = {"semseg": {"num_classes": C}, "classification": {"num_classes": C}}.get(name, {})
    return TASKS.create(name, **opts)


def split(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random raw predictions and targets for a whole split, with ignored/missing elements."""
    g = torch.Generator().manual_seed(seed)
    if name == "semseg":
        target = torch.randint(0, C - 2, (N, H, W), generator=g)  # classes 3, 4 never in target
        target[torch.rand(N, H, W, generator=g) < 0.2] = 255
        pred = torch.randn(N, C, H, W, generator=g)
        pred[:, 4] = -1e4  # class 4 is never predicted either: empty union, left out of mIoU
        return pred, target
    if name == "depth":
        target = torch.rand(N, 1, H, W, generator=g) * 9 + 0.5
        target[torch.rand(N, 1, H, W, generator=g) < 0.2] = 0
        pred = target.clamp(min=1) * torch.exp(0.3 * torch.randn(N, 1, H, W, generator=g))
        pred[torch.rand(N, 1, H, W, generator=g) < 0.05] *= -1  # some non-positive predictions
        return pred, target
    if name == "normals":
        target = F.normalize(torch.randn(N, 3, H, W, generator=g), dim=1)
        target[:, :, torch.rand(H, W, generator=g) < 0.2] = 0
        pred = (target + 0.6 * torch.randn(N, 3, H, W, generator=g)) * 3.0
        return pred, target
    if name == "edges":
        target = (torch.rand(N, 1, H, W, generator=g) < 0.3).float()
        target[torch.rand(N, 1, H, W, generator=g) < 0.2] = 255
        return torch.randn(N, 1, H, W, generator=g), target
    target = torch.randint(0, C, (N,), generator=g)
    target[:3] = 255
    return torch.randn(N, C, generator=g), target


def reference(name: str, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The metrics computed directly with NumPy over the whole split."""
    p, t = pred.double().numpy(), target.double().numpy()
    if name == "semseg":
        lab, valid = p.argmax(1), t != 255
        ious = []
        for c in range(C):
            inter = ((lab == c) & (t == c) & valid).sum()
            union = (((lab == c) | (t == c)) & valid).sum()
            if union:
                ious.append(inter / union)
        assert len(ious) == C - 1  # class 3 (predicted only) counts as 0, class 4 is left out
        return {"miou": 100 * np.mean(ious), "pixel_acc": 100 * (lab == t)[valid].mean()}
    if name == "depth":
        valid = t > 0
        p, t = p[valid], t[valid]
        return {
            "abs_err": np.abs(p - t).mean(),
            "rel_err": (np.abs(p - t) / t).mean(),
            "rmse": np.sqrt(((p - t) ** 2).mean()),
            "delta1": 100 * ((p > 0) & (np.maximum(p / t, t / p) < 1.25)).mean(),
        }
    if name == "normals":
        valid = np.linalg.norm(t, axis=1) > 0
        pn = p / np.linalg.norm(p, axis=1, keepdims=True)
        cos = np.clip((pn * t).sum(1)[valid], -1, 1)
        ang = np.degrees(np.arccos(cos))
        return {
            "mean": ang.mean(),
            "median": np.median(ang),
            **{f"within_{th:g}": 100 * (ang < th).mean() for th in (11.25, 22.5, 30)},
        }
    if name == "edges":
        valid = t != 255
        hit, edge = (1 / (1 + np.exp(-p)) > 0.5)[valid], (t == 1)[valid]
        tp, fp, fn = (hit & edge).sum(), (hit & ~edge).sum(), (~hit & edge).sum()
        prec, rec = tp / (tp + fp), tp / (tp + fn)
        return {
            "fscore": 100 * 2 * prec * rec / (prec + rec),
            "precision": 100 * prec,
            "recall": 100 * rec,
        }
    valid = t != 255
    return {"accuracy": 100 * (p.argmax(1) == t)[valid].mean()}


def stream(task, pred: torch.Tensor, target: torch.Tensor, bs: int, order=None) -> dict:
    order = torch.arange(len(pred)) if order is None else order
    metric = task.new_metric()
    for i in range(0, len(pred), bs):
        idx = order[i : i + bs]
        metric.update(pred[idx], target[idx])
    return metric.compute()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_streaming_metrics_equal_whole_split_numpy(name):
    task = make_task(name)
    pred, target = split(name)
    want = reference(name, pred, target)
    assert set(want) == set(task.higher_is_better) == set(task.primary_metrics)
    shuffled = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    for bs, order in [(1, None), (7, None), (7, shuffled), (N, None)]:
        got = stream(task, pred, target, bs, order)
        assert list(got) == list(task.primary_metrics)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-9), (name, bs, k)


def test_metrics_are_not_trivial():
    """Guard the references against degenerate data (e.g. δ1 = 0 or F-score = 0)."""
    for name in TASK_NAMES:
        values = reference(name, *split(name))
        assert all(0 < v < 100 for k, v in values.items() if k not in ("abs_err", "rel_err"))


@pytest.mark.parametrize("seed", range(6))
def test_exact_median_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    values = rng.choice(rng.uniform(0, 180, 50), n) if seed % 2 else rng.gamma(2, 10, n)
    values = values.astype(np.float32)
    cuts = np.sort(rng.integers(0, n + 1, 4))
    assert exact_median(np.split(values, cuts)) == pytest.approx(float(np.median(values)))
    assert exact_median([np.full(4, 7.5, np.float32)]) == 7.5
    assert np.isnan(exact_median([]))


def test_normals_angle_precise_for_small_errors():
    target = F.normalize(torch.randn(1, 3, 4, 4), dim=1)
    pred = target + 1e-4 * torch.randn(1, 3, 4, 4)
    m = make_task("normals").new_metric()
    m.update(pred, target)
    p, t = pred.double().numpy(), target.double().numpy()
    cross = np.linalg.norm(np.cross(p, t, axis=1), axis=1)
    ang = np.degrees(np.arctan2(cross, (p * t).sum(1)))
    assert m.compute()["mean"] == pytest.approx(ang.mean(), rel=1e-5)


# ---------------------------------------------------------------- losses


def batch(name: str, seed: int = 0):
    pred, target = split(name, seed)
    return pred[:4].clone().requires_grad_(True), target[:4]


def ignored(name: str, target: torch.Tensor) -> torch.Tensor:
    """Mask of ignored elements, broadcast to the prediction's shape."""
    if name == "semseg":
        return (target == 255)[:, None].expand(-1, C, -1, -1)
    if name == "depth":
        return target == 0
    if name == "normals":
        return (target.norm(dim=1, keepdim=True) == 0).expand(-1, 3, -1, -1)
    if name == "edges":
        return target == 255
    return (target == 255)[:, None].expand(-1, C)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_ignored_elements_do_not_contribute(name):
    task = make_task(name)
    pred, target = batch(name)
    if name == "depth":
        target = target.clone()
        target[0, 0, 0, :3] = float("nan")  # NaN depth is missing too and must not leak
    mask = ignored(name, target) | (target.isnan() if name == "depth" else False)
    assert mask.any() and not mask.all()
    loss = task.loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert (pred.grad[mask] == 0).all() and (pred.grad[~mask] != 0).any()
    changed = pred.detach().clone()
    changed[mask] = 1e3 * torch.randn(int(mask.sum()))
    assert task.loss(changed, target).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_all_ignored_batch_gives_zero_in_graph(name):
    task = make_task(name)
    pred, target = batch(name)
    fill = {"depth": 0.0, "normals": 0.0}.get(name, 255)
    target = torch.full_like(target, fill)
    loss = task.loss(pred, target)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert (pred.grad == 0).all()


def test_semseg_and_classification_loss_equal_masked_cross_entropy():
    for name in ("semseg", "classification"):
        pred, target = batch(name)
        p, t = pred.detach().double().numpy(), target.numpy()
        logp = p - np.log(np.exp(p).sum(1, keepdims=True))
        valid = t != 255
        nll = -np.take_along_axis(logp, np.where(valid, t, 0)[:, None], 1)[:, 0]
        assert make_task(name).loss(pred, target).item() == pytest.approx(nll[valid].mean(), 1e-5)


def test_depth_and_normals_losses_vanish_at_perfect_prediction():
    _, target = batch("depth")
    assert make_task("depth").loss(target.clone(), target).item() == 0
    _, target = batch("normals")
    assert make_task("normals").loss(5.0 * target, target).item() == pytest.approx(0, abs=1e-6)


def test_depth_loss_is_masked_l1():
    pred, target = batch("depth")
    p, t = pred.detach().numpy(), target.numpy()
    want = np.abs(p - t)[t > 0].mean()
    assert make_task("depth").loss(pred, target).item() == pytest.approx(want, rel=1e-5)


def test_normals_loss_is_scale_invariant_cosine():
    pred, target = batch("normals")
    task = make_task("normals")
    loss = task.loss(pred, target).item()
    assert task.loss(pred * 17.0, target).item() == pytest.approx(loss, rel=1e-5)
    p, t = pred.detach().double().numpy(), target.numpy()
    valid = np.linalg.norm(t, axis=1) > 0
    cos = (p * t).sum(1) / np.linalg.norm(p, axis=1)
    assert loss == pytest.approx((1 - cos)[valid].mean(), rel=1e-5)


def test_edge_loss_is_class_balanced_hed():
    pred, target = batch("edges")
    p, t = pred.detach().double().numpy(), target.numpy()
    valid, pos = t != 255, t == 1
    neg = valid & ~pos
    beta = neg.sum() / valid.sum()  # HED eq. 2: |Y-| / |Y|
    logsig = -np.log1p(np.exp(-p))
    log1msig = -np.log1p(np.exp(p))
    want = (-beta * logsig[pos].sum() - (1 - beta) * log1msig[neg].sum()) / valid.sum()
    task = make_task("edges")
    assert task.loss(pred, target).item() == pytest.approx(want, rel=1e-5)
    # balancing: at logits 0 each class carries the same total weight, whatever the imbalance
    zeros = torch.zeros(1, 1, 1, 10, requires_grad=True)
    labels = torch.tensor([[[[1.0, 0, 0, 0, 0, 0, 0, 0, 255, 255]]]])
    task.loss(zeros, labels).backward()
    g = zeros.grad[0, 0, 0]
    assert g[0].abs().item() == pytest.approx(g[1:8].abs().sum().item(), rel=1e-6)
    assert g[0] < 0 and (g[1:8] > 0).all() and (g[8:] == 0).all()


# ---------------------------------------------------------------- checks, kpi, contract


@pytest.mark.parametrize(
    "name,bad",
    [
        ("semseg", torch.zeros(2, 1, 4, 6, dtype=torch.long)),
        ("depth", torch.ones(2, 3, 4, 6)),
        ("normals", torch.ones(2, 3, 4, 5)),
        ("edges", torch.ones(3, 1, 4, 6)),
        ("classification", torch.zeros(2, 1, dtype=torch.long)),
    ],
)
def test_check_target_names_task_and_shapes(name, bad):
    task = make_task(name)
    image = torch.zeros(2, 3, 4, 6)
    good = task.expected_shape(tuple(image.shape))
    dtype = torch.long if name in ("semseg", "classification") else torch.float32
    task.check_target(torch.zeros(good, dtype=dtype), image)
    msg = f"task {name!r}: target shape {tuple(bad.shape)} does not match the expected {good} "
    with pytest.raises(DataError, match=re.escape(msg + "for image (2, 3, 4, 6)")):
        task.check_target(bad, image)


def test_check_target_dtype_and_values():
    image = torch.zeros(2, 3, 4, 6)
    with pytest.raises(DataError, match="semseg.*float32"):
        make_task("semseg").check_target(torch.zeros(2, 4, 6), image)
    with pytest.raises(DataError, match="depth.*int64"):
        make_task("depth").check_target(torch.zeros(2, 1, 4, 6, dtype=torch.long), image)
    labels = torch.full((2, 4, 6), 255)
    make_task("semseg").check_target(labels, image)  # all ignored is fine
    labels[1, 2, 3] = C
    with pytest.raises(DataError, match=f"semseg.*label {C}"):
        make_task("semseg").check_target(labels, image)
    with pytest.raises(DataError, match="classification.*label -1"):
        make_task("classification").check_target(torch.tensor([0, -1]), image)
    edges = torch.zeros(2, 1, 4, 6)
    edges[0, 0, 0, 0] = 0.5
    with pytest.raises(DataError, match="edges.*0.5"):
        make_task("edges").check_target(edges, image)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError):
        TASKS.create("edges", threshold=1.5)
    with pytest.raises(ConfigError):
        TASKS.create("semseg", num_classes=13, ignore_index=3)
    with pytest.raises(ConfigError, match="num_classses"):
        TASKS.create("semseg", num_classses=13)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_kpi_contract_and_names(name):
    task = make_task(name)
    assert task.name == name
    metrics = stream(task, *split(name), bs=7)
    kpi = task.kpi(metrics)
    assert 0 <= kpi <= 1
    assert kpi == pytest.approx(metrics[task.kpi_metric] / 100)
    assert task.higher_is_better[task.kpi_metric]
    assert task.kpi({}) == 0.0
    pred = split(name)[0]
    want = {"semseg": (N, H, W), "normals": (N, 3, H, W), "classification": (N,)}
    assert tuple(task.postprocess(pred).shape) == want.get(name, (N, 1, H, W))


def test_metric_rejects_prediction_of_wrong_size():
    pred, target = split("depth")
    with pytest.raises(DataError, match="prediction shape"):
        make_task("depth").new_metric().update(pred[..., :-1], target)
