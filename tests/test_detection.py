"""Detection: the COCO metric (hand-made cases and an independent reference), NMS, boxes in the
batch contract and under augmentation, the FCOS loss and decoding, every architecture hosting
it, and a short run in which detection + depth with hard sharing learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlcv.data.base import collate
from mtlcv.data.transforms import hflip, resize, scale_crop
from mtlcv.errors import DataError
from mtlcv.models import build_model
from mtlcv.registry import ARCHS, BALANCERS, TASKS
from mtlcv.tasks.detection import (
    Boxes,
    Detection,
    box_iou,
    coco_map,
    nms,
)


def det(boxes, scores, labels=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    labels = np.zeros(len(boxes), int) if labels is None else np.asarray(labels)
    return boxes, np.asarray(scores, float), labels


def gt(boxes, labels=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return boxes, np.zeros(len(boxes), int) if labels is None else np.asarray(labels)


# ---------------------------------------------------------------- hand-made cases


def test_no_predictions_scores_zero_and_no_ground_truth_is_nan():
    r = coco_map([det([], [])], [gt([[0, 0, 10, 10]])], 1)
    assert r == {"map50": 0.0, "map": 0.0}
    r = coco_map([det([[0, 0, 10, 10]], [0.9])], [gt([])], 1)
    assert math.isnan(r["map50"]) and math.isnan(r["map"])


def test_a_perfect_detection_scores_100():
    r = coco_map([det([[1, 2, 11, 12]], [0.3])], [gt([[1, 2, 11, 12]])], 1)
    assert r["map50"] == pytest.approx(100, abs=1e-9) and r["map"] == pytest.approx(100, abs=1e-9)


def test_exact_iou_thresholds_count_as_matches():
    # IoU exactly 0.5 (50 / 100): a match at 0.5 only; exactly 0.75: at 0.5 ... 0.75 (6 of 10)
    half = coco_map([det([[0, 0, 10, 5]], [1.0])], [gt([[0, 0, 10, 10]])], 1)
    assert half["map50"] == pytest.approx(100) and half["map"] == pytest.approx(10)
    quarter = coco_map([det([[0, 0, 10, 7.5]], [1.0])], [gt([[0, 0, 10, 10]])], 1)
    assert quarter["map"] == pytest.approx(60)
    below = coco_map([det([[0, 0, 10, 4.99]], [1.0])], [gt([[0, 0, 10, 10]])], 1)
    assert below == {"map50": 0.0, "map": 0.0}


def test_duplicates_are_false_positives():
    # det 1 (0.9): IoU 0.6 with the object; det 2 (0.8): IoU 1. At IoU 0.5-0.6 det 1 matches
    # and det 2 is a duplicate (a false positive after the true one: AP 1); above 0.6 det 1 is
    # a false positive before the true det 2: precision 1/2 at recall 1 (AP 0.5).
    r = coco_map([det([[0, 0, 10, 6], [0, 0, 10, 10]], [0.9, 0.8])], [gt([[0, 0, 10, 10]])], 1)
    assert r["map50"] == pytest.approx(100)
    assert r["map"] == pytest.approx(100 * (3 * 1 + 7 * 0.5) / 10)
    # two copies of one box on one object: the second is a false positive, AP stays 1
    r = coco_map([det([[0, 0, 10, 10]] * 2, [0.9, 0.9])], [gt([[0, 0, 10, 10]])], 1)
    assert r["map"] == pytest.approx(100)


def test_101_point_interpolation():
    # 2 objects; ranked TP, FP, TP: recall 0.5, 0.5, 1; precision 1, 1/2, 2/3 -> envelope
    # 1, 2/3, 2/3; the 51 recall points 0..0.50 read 1, the 50 points 0.51..1 read 2/3
    d = det([[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]], [0.9, 0.8, 0.7])
    r = coco_map([d], [gt([[0, 0, 10, 10], [20, 0, 30, 10]])], 1)
    assert r["map50"] == pytest.approx(100 * (51 + 50 * 2 / 3) / 101)


def test_crowd_of_overlapping_boxes_is_matched_one_to_one():
    # twelve objects, each shifted 1 px from the last (neighbours overlap with IoU 0.82):
    # detections equal to the objects, in a shuffled score order, each take their own object
    objects = [[i, 0, i + 10, 10] for i in range(12)]
    rng = np.random.default_rng(0)
    scores = rng.permutation(12) / 12 + 0.01
    r = coco_map([det(objects, scores)], [gt(objects)], 1)
    assert r["map"] == pytest.approx(100)
    # one detection between two objects can take only one of them
    r = coco_map([det([[0.5, 0, 10.5, 10]], [0.9])], [gt(objects[:2])], 1)
    assert r["map50"] == pytest.approx(100 * 51 / 101)  # recall 1/2, precision 1


def test_classes_are_scored_apart_and_a_class_without_objects_is_left_out():
    objects = gt([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 1])
    right = det([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.9], [0, 1])
    wrong = det([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.9], [1, 0])
    assert coco_map([right], [objects], 3)["map"] == pytest.approx(100)
    assert coco_map([wrong], [objects], 3)["map"] == 0.0
    extra = det([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0.9, 0.9, 0.95], [0, 1, 2])
    assert coco_map([extra], [objects], 3)["map"] == pytest.approx(100)  # class 2: no objects


# ---------------------------------------------------------------- independent reference


def reference_map(dets, gts, num_classes, max_det=100):
    """The COCO procedure written out plainly (pycocotools' evaluateImg + accumulate +
    summarize for bbox, area 'all', no crowds): lists and loops, nothing shared with mtlcv."""

    def iou(a, b):
        iw = min(a[2], b[2]) - max(a[0], b[0])
        ih = min(a[3], b[3]) - max(a[1], b[1])
        inter = max(iw, 0.0) * max(ih, 0.0)
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    thresholds = [(50 + 5 * k) / 100 for k in range(10)]  # the decimals 0.50 ... 0.95
    thresholds[8] = math.nextafter(0.9, 0)  # pycocotools' linspace gives 0.8999999999999999
    # pycocotools' recall points are k * 0.01 (np.linspace), not the decimals k / 100: 0.07 is
    # 0.07000000000000001 there, so a recall of exactly 7/100 does not reach that point
    recalls = [k * 0.01 for k in range(101)]
    per_t = {t: [] for t in range(10)}
    for c in range(num_classes):
        records, n_gt = [], 0
        for (db, ds, dl), (gb, gl) in zip(dets, gts):
            g = [list(map(float, b)) for b, lab in zip(gb, gl) if lab == c]
            d = sorted([(float(s), list(map(float, b))) for b, s, lab in zip(db, ds, dl)
                        if lab == c], key=lambda p: -p[0])[:max_det]
            n_gt += len(g)
            for ti, t in enumerate(thresholds):
                used = [False] * len(g)
                for s, b in d:
                    best, m = min(t, 1 - 1e-10), -1
                    for j, gg in enumerate(g):
                        if used[j] or iou(b, gg) < best:
                            continue
                        best, m = iou(b, gg), j
                    if m >= 0:
                        used[m] = True
                    records.append((ti, s, m >= 0))
        if n_gt == 0:
            continue
        for ti in range(10):
            rec = [r for r in records if r[0] == ti]
            rec = sorted(rec, key=lambda r: -r[1])  # Python's sort is stable like mergesort
            tp = fp = 0
            prec, rc = [], []
            for _, _, hit in rec:
                tp, fp = tp + hit, fp + (not hit)
                prec.append(tp / (tp + fp + np.spacing(1)))
                rc.append(tp / n_gt)
            for i in range(len(prec) - 1, 0, -1):
                prec[i - 1] = max(prec[i - 1], prec[i])
            q = []
            for r in recalls:
                idx = next((i for i, v in enumerate(rc) if v >= r), None)
                q.append(prec[idx] if idx is not None else 0.0)
            per_t[ti].append(sum(q) / len(q))
    if not per_t[0]:
        return {"map50": math.nan, "map": math.nan}
    return {"map50": 100 * np.mean(per_t[0]),
            "map": 100 * np.mean([v for ti in range(10) for v in per_t[ti]])}


def random_split(rng, n_images, num_classes, max_det=100):
    dets, gts = [], []
    for _ in range(n_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 50, (n, 2))
        g = np.concatenate([xy, xy + rng.uniform(4, 30, (n, 2))], 1).round()
        gl = rng.integers(0, num_classes, n)
        # detections: jittered copies of objects (some relabelled), duplicates and clutter
        k = int(rng.integers(0, 12))
        src = rng.integers(0, max(n, 1), k)
        d = (g[src] if n else np.zeros((k, 4))) + rng.normal(0, 3, (k, 4)).round()
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2] + 1)
        dl = np.where(rng.uniform(size=k) < 0.8, gl[src] if n else 0,
                      rng.integers(0, num_classes, k))
        ds = rng.choice([0.3, 0.5, 0.7, 0.9], k)  # ties on purpose
        dets.append((d, ds, dl))
        gts.append((g, gl))
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
def test_map_equals_an_independent_reference_implementation(seed):
    rng = np.random.default_rng(seed)
    dets, gts = random_split(rng, 25, 3)
    want = reference_map(dets, gts, 3)
    got = coco_map(dets, gts, 3)
    assert got["map50"] == pytest.approx(want["map50"], abs=1e-9)
    assert got["map"] == pytest.approx(want["map"], abs=1e-9)
    assert 0 < got["map"] < got["map50"] < 100  # a case that exercises partial matches


def test_max_detections_per_image_and_class():
    objects = gt([[0, 0, 10, 10]])
    clutter = [[100 + i, 0, 110 + i, 10] for i in range(5)]
    d = det(clutter + [[0, 0, 10, 10]], [0.9] * 5 + [0.1])
    assert coco_map([d], [objects], 1, max_detections=5)["map"] == 0.0
    assert coco_map([d], [objects], 1, max_detections=6)["map"] == pytest.approx(100 / 6)


# ---------------------------------------------------------------- boxes, NMS


def test_box_iou():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], float)
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0], [0, 0]])


def test_nms_is_per_class_and_suppresses_above_the_threshold_only():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6], [0, 4, 10, 10], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.7, 0.8, 0.6, 0.9])
    labels = torch.tensor([0, 0, 0, 1])
    # boxes 1 and 2 overlap box 0 with IoU exactly 0.6 and each other with 0.2; box 3 is box 0
    # in another class. Suppression needs IoU > threshold.
    assert nms(boxes, scores, labels, 0.6).tolist() == [3, 1, 0, 2]
    assert nms(boxes, scores, labels, 0.59).tolist() == [3, 1, 2]
    assert nms(boxes, scores, None, 0.5).tolist() == [3]  # one class: box 3 takes all


def test_nms_equals_plain_greedy_suppression_and_max_keep_stops_early():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        xy = torch.rand(200, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 20 + 1], 1)
        scores = torch.rand(200, generator=g).round(decimals=1)  # many ties
        labels = torch.randint(3, (200,), generator=g)
        order = sorted(range(200), key=lambda i: -float(scores[i]))  # stable
        iou, lab = box_iou(boxes, boxes), labels.tolist()
        kept: list[int] = []
        for i in order:
            if all(lab[j] != lab[i] or iou[j, i] <= 0.5 for j in kept):
                kept.append(i)
        assert nms(boxes, scores, labels, 0.5).tolist() == kept
        assert nms(boxes, scores, labels, 0.5, max_keep=20).tolist() == kept[:20]


def test_boxes_collate_pads_and_moves_with_the_image():
    a = Boxes([[1, 2, 5, 6], [0, 0, 3, 3]], [2, 0])
    b = Boxes(torch.zeros(0, 4), [])
    batch = collate([{"image": torch.zeros(3, 8, 10), "detection": a},
                     {"image": torch.zeros(3, 8, 10), "detection": b}])
    assert batch["image"].shape == (2, 3, 8, 10)
    assert batch["detection"].tolist() == [[[1, 2, 5, 6, 2], [0, 0, 3, 3, 0]],
                                           [[0, 0, 0, 0, -1], [0, 0, 0, 0, -1]]]
    flipped = a.hflip(10)
    assert flipped.boxes.tolist() == [[5, 2, 9, 6], [7, 0, 10, 3]]
    assert torch.equal(flipped.hflip(10).boxes, a.boxes)
    # crop [2, 8) x [1, 7), then scale x2: clipped, the box left outside is dropped
    c = a.crop_resize(1, 2, 6, 6, (12, 12))
    assert c.boxes.tolist() == [[0, 2, 6, 10], [0, 0, 2, 4]]
    gone = a.crop_resize(0, 4, 8, 6, (8, 6))
    assert gone.labels.tolist() == [2]


def rectangles_sample(rects, h=40, w=60):
    """A sample whose label map draws every rectangle with its label (later ones on top)."""
    seg = torch.full((h, w), 255, dtype=torch.long)
    for (x1, y1, x2, y2), c in rects:
        seg[y1:y2, x1:x2] = c
    return {"image": torch.rand(3, h, w), "semseg": seg,
            "detection": Boxes([r for r, _ in rects], [c for _, c in rects])}


def mask_box(seg, c):
    ys, xs = torch.nonzero(seg == c, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("scale, top, left", [(1.0, 0, 0), (1.2, 3, 7), (1.5, 13, 20),
                                              (1.5, 0, 0)])
def test_box_augmentation_agrees_with_the_label_map(scale, top, left):
    rects = [((5, 4, 20, 30), 0), ((30, 10, 55, 22), 1), ((40, 25, 58, 39), 2), ((1, 33, 4, 38), 3)]
    sample = rectangles_sample(rects)
    for out in (scale_crop(sample, scale, top, left), hflip(scale_crop(sample, scale, top, left)),
                resize(sample, (20, 90))):
        boxes = dict(zip(out["detection"].labels.tolist(), out["detection"].boxes.tolist()))
        present = {int(c) for c in out["semseg"].unique() if c != 255}
        assert set(boxes) == present  # an object cropped away loses its box
        for c in present:
            # nearest resampling of the labels moves an edge by less than one output pixel
            np.testing.assert_allclose(boxes[c], mask_box(out["semseg"], c), atol=1.0)


def test_scenes_boxes_are_the_objects_tight_boxes_and_flip_exactly():
    from mtlcv.data.scenes import render

    r = render(3, size=(48, 64), seed=2, return_meta=True)
    start = 0
    for i, n in enumerate(r["box_count"]):
        objs, boxes = r["objects"][i], r["boxes"][start:start + n]
        for obj, box in zip(r["box_object"][start:start + n], boxes):
            assert mask_box(torch.from_numpy(objs), int(obj)) == box.tolist()
        sample = {"image": torch.zeros(3, 48, 64), "objects": torch.from_numpy(objs),
                  "detection": Boxes(boxes, r["box_class"][start:start + n])}
        flipped = hflip(sample)
        for obj, box in zip(r["box_object"][start:start + n], flipped["detection"].boxes):
            assert mask_box(flipped["objects"], int(obj)) == box.tolist()
        start += n
    assert r["box_count"].sum() > 5


# ---------------------------------------------------------------- the task


@pytest.fixture()
def task() -> Detection:
    return TASKS.create("detection", num_classes=3)


def target_of(*images):
    return Boxes.collate([Boxes([b for b, _ in im], [c for _, c in im]) for im in images])


def perfect_prediction(task, target, h, w):
    """Raw head outputs that decode to exactly the target's boxes."""
    labels, dist, pos = task.assign(target, h, w)
    raw = torch.full((len(target), task.channels, h, w), -30.0)
    raw[:, : task.num_classes] -= task.prior_logit
    for c in range(task.num_classes):
        raw[:, c][labels == c] = 30.0 - task.prior_logit
    y = dist.clamp(min=1e-3) / task.box_scale
    raw[:, task.num_classes : task.num_classes + 4] = y + torch.log(-torch.expm1(-y))
    raw[:, -1] = 0.0
    return raw


def test_assignment_takes_the_smallest_box_and_the_pixel_centres(task):
    target = target_of([((2, 3, 12, 15), 0), ((5, 5, 9, 9), 1)], [])
    labels, dist, pos = task.assign(target, 20, 30)
    assert labels[0, 6, 6] == 1 and labels[0, 4, 3] == 0 and labels[0, 0, 0] == -1
    assert dist[0, :, 6, 6].tolist() == [1.5, 1.5, 2.5, 2.5]  # centre (6.5, 6.5) in (5, 5, 9, 9)
    assert int(pos[0].sum()) == 10 * 12 and not pos[1].any()


def test_decoding_a_perfect_prediction_recovers_the_boxes(task):
    objects = [((2, 3, 12, 15), 0), ((20, 1, 29, 19), 2), ((14, 4, 18, 8), 1)]
    target = target_of(objects, [])
    out = task.postprocess(perfect_prediction(task, target, 20, 30))
    got = sorted(zip(out[0]["labels"].tolist(), out[0]["boxes"].tolist()))
    want = sorted((c, list(map(float, b))) for b, c in objects)
    assert [c for c, _ in got] == [c for c, _ in want]
    np.testing.assert_allclose([b for _, b in got], [b for _, b in want], atol=1e-3)
    assert len(out[1]["boxes"]) == 0
    metric = task.new_metric()
    metric.update(perfect_prediction(task, target, 20, 30), target)
    assert metric.compute()["map"] == pytest.approx(100, abs=1e-6)


def test_loss_is_lower_for_a_better_prediction_and_finite_without_objects(task):
    target = target_of([((2, 3, 12, 15), 0)], [((5, 5, 9, 9), 1)])
    good = perfect_prediction(task, target, 20, 30)
    zero = torch.zeros_like(good, requires_grad=True)
    assert task.loss(good, target) < task.loss(zero, target)
    empty = target_of([], [])
    loss = task.loss(zero, empty)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()
    assert zero.grad[:, : task.num_classes].abs().sum() > 0  # the negatives still learn
    assert zero.grad[:, task.num_classes :].abs().sum() == 0


def test_metric_does_not_depend_on_batch_size(task):
    torch.manual_seed(0)
    target = target_of([((2, 3, 12, 15), 0), ((20, 1, 29, 19), 2)], [((5, 5, 9, 9), 1)],
                       [((1, 1, 28, 18), 1)])
    pred = perfect_prediction(task, target, 20, 30) + 4 * torch.randn(3, task.channels, 20, 30)
    whole, single = task.new_metric(), task.new_metric()
    whole.update(pred, target)
    for i in range(3):
        single.update(pred[i : i + 1], target[i : i + 1, : int((target[i, :, 4] >= 0).sum())])
    assert whole.compute() == single.compute()


def test_metric_states_merge_in_rank_order_to_the_whole_split(task):
    """Processes evaluating contiguous runs of the split merge (pickled, as gathered) into the
    whole split's detections in order: the same mAP exactly, ties of scores between images
    included (a perfect prediction gives every box the same score)."""
    import pickle

    target = target_of([((2, 3, 12, 15), 0), ((20, 1, 29, 19), 2)], [((5, 5, 9, 9), 1)],
                       [((1, 1, 28, 18), 1)], [((4, 4, 10, 12), 0)])
    g = torch.Generator().manual_seed(1)
    pred = perfect_prediction(task, target, 20, 30)
    pred[2:] += 3 * torch.randn(2, task.channels, 20, 30, generator=g)  # errors, same scores
    whole, first, second = task.new_metric(), task.new_metric(), task.new_metric()
    whole.update(pred, target)
    first.update(pred[:2], target[:2])
    second.update(pred[2:], target[2:])
    first.merge(pickle.loads(pickle.dumps(second.state())))
    assert len(first.detections) == 4
    assert first.compute() == whole.compute()
    assert 0 < whole.compute()["map"] < 100


def test_loss_count_is_what_the_loss_divides_by(task):
    """The count is the positive locations at the prediction's resolution (at least 1), so the
    count-weighted mean of two halves' losses is the whole batch's loss when its IoU term
    vanishes (exact boxes; focal and centerness terms divided by the positives)."""
    target = target_of([((2, 3, 12, 15), 0), ((20, 1, 29, 19), 2)], [((5, 5, 9, 9), 1)],
                       [((1, 1, 28, 18), 1), ((14, 4, 18, 8), 2)])
    pred = perfect_prediction(task, target, 20, 30)
    g = torch.Generator().manual_seed(0)
    c = task.num_classes
    pred[:, :c] += 2 * torch.randn(3, c, 20, 30, generator=g)  # classes and centerness wrong,
    pred[:, -1] += torch.randn(3, 20, 30, generator=g)  # the distances exact
    _, _, pos = task.assign(target, 20, 30)
    assert float(task.loss_count(target, pred)) == float(pos.sum())
    assert float(task.loss_count(target)) == float(pos.sum())  # boxes inside the image
    assert float(task.loss_count(target_of([], []), pred[:2])) == 1.0  # negatives still count
    parts = [(pred[:1], target[:1]), (pred[1:], target[1:])]
    counts = [task.loss_count(t, p) for p, t in parts]
    combined = sum(n * task.loss(p, t) for n, (p, t) in zip(counts, parts)) / sum(counts)
    assert float(combined) == pytest.approx(float(task.loss(pred, target)), rel=1e-6)
    mean = sum(task.loss(p, t) for p, t in parts) / 2
    assert abs(float(mean) - float(task.loss(pred, target))) > 1e-3  # a plain mean is not


@pytest.mark.parametrize("rows, message", [
    ([[5, 0, 2, 4, 0]], "box 0 has negative width"),
    ([[0, 5, 4, 5, 1]], "box 0 has zero height"),
    ([[0, 0, 4, 4, 3]], "class 3, outside \\[0, 3\\)"),
    ([[0, 0, 4, 4, -2]], "class -2"),
    ([[0, 0, float("nan"), 4, 0]], "non-finite"),
])
def test_bad_boxes_are_one_line_errors(task, rows, message):
    with pytest.raises(DataError, match=message):
        task.check_target(torch.tensor([rows], dtype=torch.float32), torch.zeros(1, 3, 8, 8))


def test_unbatched_or_misshapen_targets_are_one_line_errors(task):
    image = torch.zeros(2, 3, 8, 8)
    with pytest.raises(DataError, match="batch with mtlcv.data.collate"):
        task.check_target([Boxes([[0, 0, 1, 1]], [0])] * 2, image)
    with pytest.raises(DataError, match=r"not the expected \[B, M, 5\]"):
        task.check_target(torch.zeros(2, 3, 4), image)
    task.check_target(target_of([((0, 0, 4, 4), 2)], []), image)  # fine


@pytest.mark.parametrize("arch", ARCHS.names())
def test_every_architecture_hosts_detection(arch):
    torch.manual_seed(0)
    tasks = {"detection": TASKS.create("detection", num_classes=3), "depth": TASKS.create("depth")}
    model = build_model(arch, tasks, {"name": "tiny", "width": 8}, {"name": "light"})
    image = torch.rand(2, 3, 32, 48)
    target = {"detection": target_of([((2, 3, 20, 15), 0)], [((30, 5, 45, 30), 2)]),
              "depth": torch.rand(2, 1, 32, 48) + 0.5}
    out = model(image)
    loss = sum(tasks[t].loss(out[t], target[t]) for t in tasks)
    for t, extra in model.deep_supervision().items():
        loss = loss + sum(w * tasks[t].loss(p, target[t]) for w, p in extra)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    metric = tasks["detection"].new_metric()
    metric.update(out["detection"].detach(), target["detection"])
    assert set(metric.compute()) == {"map50", "map"}


# ---------------------------------------------------------------- training, the CLI


@pytest.mark.slow
def test_detection_and_depth_with_hard_sharing_learn(scenes_root):
    from mtlcv.data.scenes import ScenesDataset
    from mtlcv.engine.evaluate import evaluate

    torch.manual_seed(0)
    data = torch.utils.data.Subset(ScenesDataset(scenes_root, "train"), range(16))
    tasks = {"detection": TASKS.create("detection", num_classes=10),
             "depth": TASKS.create("depth")}
    model = build_model("hps", tasks, {"name": "tiny", "width": 8}, {"name": "light"})
    train = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate,
                                        generator=torch.Generator().manual_seed(0))
    whole = torch.utils.data.DataLoader(data, batch_size=16, collate_fn=collate)
    before = evaluate(model, tasks, whole, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(20):
        for batch in train:
            out = model(batch["image"])
            loss = sum(tasks[t].loss(out[t], batch[t]) for t in tasks)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = evaluate(model, tasks, whole, torch.device("cpu"))
    assert before["detection"]["map50"] < 2
    assert after["detection"]["map50"] > 10 + 5 * before["detection"]["map50"]
    assert after["depth"]["abs_err"] < before["depth"]["abs_err"]


def test_train_and_compare_run_detection_from_the_cli(small_cfg, tmp_path, capsys):
    import json

    import yaml

    from mtlcv.cli import main

    # two steps leave mAP at 0, which Δm cannot divide by: no baseline here (the docs' grid has
    # one); Δm without auxiliary tasks is tested in test_aux_tasks.py
    cfg = dict(small_cfg, tasks=["depth", "detection"], aux_tasks=["detection"])
    cfg["train"] = {"epochs": 1, "max_steps": 2, "progress": False}
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "grid"
    rc = main(["compare", "--config", str(path), "--vary", "model.arch=stl,hps", "--out",
               str(out)])
    assert rc == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in rows] == ["stl", "hps"]
    assert set(rows[1]["test"]["detection"]) == {"map50", "map"}
    table = (out / "summary.md").read_text()
    assert "depth abs_err ↓" in table and "detection (aux) map50 ↑" in table
    assert table.index("depth delta1") < table.index("detection (aux)")  # shown apart, last
    results = json.loads((out / "hps" / "seed0" / "results.json").read_text())
    assert results["aux_tasks"] == ["detection"]
    assert "detection" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(4))
def test_map_equals_pycocotools_when_installed(seed, capsys):
    """The authors' evaluation code, when present (it is not a dependency of mtlcv)."""
    coco = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    rng = np.random.default_rng(100 + seed)
    dets, gts = random_split(rng, 30, 4)
    images, annotations, results = [], [], []
    for i, ((db, ds, dl), (gb, gl)) in enumerate(zip(dets, gts)):
        images.append({"id": i, "width": 100, "height": 100})
        for b, c in zip(gb, gl):
            w, h = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c),
                                "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, s, c in zip(db, ds, dl):
            results.append({"image_id": i, "category_id": int(c), "score": float(s),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    truth = coco.COCO()
    truth.dataset = {"images": images, "annotations": annotations,
                     "categories": [{"id": k} for k in range(4)]}
    truth.createIndex()
    ev = cocoeval.COCOeval(truth, truth.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    capsys.readouterr()
    got = coco_map(dets, gts, 4)
    assert got["map"] == pytest.approx(100 * ev.stats[0], abs=1e-9)
    assert got["map50"] == pytest.approx(100 * ev.stats[1], abs=1e-9)


@pytest.mark.parametrize("method", BALANCERS.names())
def test_every_balancer_steps_with_detection(method):
    from mtlcv import balancing

    torch.manual_seed(0)
    tasks = {"detection": TASKS.create("detection", num_classes=3), "depth": TASKS.create("depth")}
    model = build_model("hps", tasks, {"name": "tiny", "width": 8}, {"name": "light"})
    target = {"detection": target_of([((2, 3, 20, 15), 0)], [((30, 5, 45, 30), 2)]),
              "depth": torch.rand(2, 1, 32, 48) + 0.5}
    out = model(torch.rand(2, 3, 32, 48))
    losses = torch.stack([tasks[t].loss(out[t], target[t]) for t in tasks])
    balancing.create(method, num_tasks=2).backward(losses, model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
