"""Object detection: an FCOS-style anchor-free dense head, per-class NMS, COCO mAP over the split.

**Why FCOS and not CenterNet.** In mtlcv every dense task is predicted by the architecture's
head at the backbone's stride and upsampled bilinearly to the image size (``TaskHead``), so one
head serves every task and every architecture. FCOS (Tian, Shen, Chen & He, "FCOS: Fully
Convolutional One-Stage Object Detection", ICCV 2019) predicts at *every* location inside an
object its class, the distances ``(l, t, r, b)`` to the four sides of the box and a
"centerness": the box does not depend on which location is picked, and the distance maps are
linear in the location inside an object, which a bilinearly upsampled coarse map represents
well. CenterNet (Zhou, Wang & Krähenbühl, "Objects as Points", 2019) reads the box at the peak
of a centre heat-map, and its size and offset are trained at that one pixel only: after a
bilinear upsampling the peaks of a coarse map sit on the coarse grid (a bilinear patch takes its
maximum at a corner), so its boxes would be quantised to the backbone's stride. FCOS's per-pixel
classification is also the same kind of target as semantic segmentation, which is what hard
sharing trains next to it.

**Head output** (``channels = num_classes + 5``), at the image resolution, for location
``(x, y)`` = the centre of a pixel (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``):

* ``[0, C)``: class logits, to which the task adds the RetinaNet prior ``log(π / (1 − π))``,
  π = 0.01 (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Sec. 4.1; FCOS
  initialises its classifier's bias to it). Adding it in the task instead of initialising the
  head's bias gives every architecture's head the same start without the head knowing about
  detection;
* ``[C, C+4)``: ``(l, t, r, b)`` in pixels = ``box_scale · softplus(raw)``. FCOS uses
  ``exp(s · raw)`` (its code's later configurations ReLU); softplus is positive like exp,
  never saturates to a zero gradient like ReLU, and is nearly linear for large values, which
  keeps the upsampled distance maps close to linear;
* ``C + 4``: the centerness logit.

**Targets and loss** (FCOS Sec. 3.1-3.3, eq. 2-3, and the authors' code). A location inside
several boxes is assigned the one of smallest area; one inside none is negative. FCOS's
multi-level FPN assignment by regression range has no counterpart here: there is one level, the
image resolution, so every location strictly inside a box is positive (FCOS without centre
sampling). The loss is ``L_cls + L_reg + L_ctr``:

* ``L_cls``: sigmoid focal loss, α = 0.25, γ = 2 (Lin et al. 2017), summed over every location
  and class, divided by the number of positives (at least 1);
* ``L_reg``: IoU loss ``−ln IoU`` (Yu et al., "UnitBox", ACM MM 2016) of the predicted and the
  target distances, with the authors' +1 smoothing ``(I + 1) / (U + 1)``, averaged over the
  positives weighted by their centerness target, as the authors' code does (the paper averages
  unweighted; the weights keep the border locations, whose boxes are never kept by NMS, from
  dominating at full resolution);
* ``L_ctr``: binary cross-entropy of the centerness logit against
  ``sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))`` (eq. 3), over the positives, divided
  by their number.

A batch without objects still has negatives to learn from: its ``L_cls`` is the focal loss of
all locations, its other two terms are an exact 0 in the graph.

**Decoding** (:meth:`Detection.postprocess`, the authors' ``FCOSPostProcessor``): locations
whose class probability exceeds 0.05 are candidates, scored ``sqrt(p_class · centerness)``; the
best 1000 per image are decoded to ``(x − l, y − t, x + r, y + b)``, clipped to the image,
reduced by per-class greedy non-maximum suppression at IoU 0.6, and the best 100 are kept.

**Metric**: COCO mAP (Lin et al., "Microsoft COCO", ECCV 2014; the procedure of
``pycocotools.cocoeval``) over all detections of the whole split: ``map`` = AP averaged over
the IoU thresholds 0.50:0.05:0.95 and over classes, ``map50`` at IoU 0.5, in percent; see
:func:`coco_precision`.

Batch contract: per sample a :class:`Boxes` (``boxes`` float ``[N, 4]`` as ``(x1, y1, x2,
y2)`` in pixels, ``labels`` long ``[N]`` in ``[0, num_classes)``); :meth:`Boxes.collate` pads
them into the batched target, a float tensor ``[B, M, 5]`` of rows ``(x1, y1, x2, y2, class)``
where rows with class −1 are padding. :meth:`Boxes.hflip` and :meth:`Boxes.crop_resize` move
boxes with the image in :mod:`mtlcv.data.transforms` (clipped to the window; boxes left empty
are dropped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..registry import TASKS
from .base import Metric, Task

#: COCO's IoU thresholds, computed exactly as pycocotools does (0.9 is 0.8999999999999999 there)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: COCO's 101 recall points
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
PAD = -1  # class of a padding row in the batched target


# ----------------------------------------------------------------------------- the target


@dataclass
class Boxes:
    """The detection target of one image: ``boxes`` float [N, 4] ``(x1, y1, x2, y2)`` in pixels,
    ``labels`` long [N]. Moves with the image under the joint augmentation and batches itself
    (the batch contract's variable-length target; see the module docstring).
    """

    boxes: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise DataError(f"detection target: {len(self.boxes)} boxes but "
                            f"{len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def hflip(self, width: int) -> Boxes:
        """Mirrored left-right in an image ``width`` pixels wide (``x -> width − x``)."""
        b = self.boxes
        return Boxes(torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1),
                     self.labels.clone())

    def crop_resize(self, top: float, left: float, height: float, width: float,
                    size: Sequence[int]) -> Boxes:
        """Crop the window ``[left, left+width) x [top, top+height)``, then scale it to ``size``
        = (H, W). Boxes are clipped to the window; boxes left without area are dropped."""
        b = self.boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
        b = torch.minimum(b.clamp(min=0), torch.tensor([width, height, width, height],
                                                        dtype=torch.float32))
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        scale = torch.tensor([size[1] / width, size[0] / height] * 2, dtype=torch.float32)
        return Boxes(b[keep] * scale, self.labels[keep])

    @staticmethod
    def collate(items: Sequence[Boxes]) -> torch.Tensor:
        """Pad a batch's targets into ``[B, M, 5]`` rows ``(x1, y1, x2, y2, class)``; padding
        rows are ``(0, 0, 0, 0, −1)`` and ``M`` is the largest count in the batch."""
        m = max((len(b) for b in items), default=0)
        out = torch.zeros(len(items), m, 5)
        out[..., 4] = PAD
        for i, b in enumerate(items):
            out[i, : len(b), :4] = b.boxes
            out[i, : len(b), 4] = b.labels.float()
        return out


def unpad(target: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[B, M, 5]`` -> per image ``(boxes [N, 4], labels long [N])`` without the padding."""
    out = []
    for rows in target:
        rows = rows[rows[:, 4] >= 0]
        out.append((rows[:, :4], rows[:, 4].long()))
    return out


def check_boxes(boxes: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> list[str]:
    """One line per bad box (non-finite, negative or zero size, class outside the range)."""
    boxes, labels = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels).reshape(-1)
    problems = []
    for j, (b, c) in enumerate(zip(boxes, labels)):
        w, h = b[2] - b[0], b[3] - b[1]
        if not np.isfinite(b).all():
            problems.append(f"{where}: box {j} has a non-finite coordinate {b.tolist()}")
        elif w <= 0 or h <= 0:
            side, lo, hi = ("width", "x", b[[0, 2]]) if w <= 0 else ("height", "y", b[[1, 3]])
            kind = "negative" if min(w, h) < 0 else "zero"
            problems.append(f"{where}: box {j} has {kind} {side} ({lo}1 {hi[0]:g}, "
                            f"{lo}2 {hi[1]:g}); expected {lo}2 > {lo}1")
        if not (c == int(c) and 0 <= c < num_classes):
            problems.append(f"{where}: box {j} has class {c:g}, outside [0, {num_classes})")
    return problems


# ----------------------------------------------------------------------------- boxes


def box_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of ``(x1, y1, x2, y2)`` boxes (float64; areas w·h, as
    pycocotools, no +1)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None = None,
        iou_threshold: float = 0.6, max_keep: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression, per class when ``labels`` are given.

    In decreasing score order (ties: the earlier box first), a box is kept unless a kept box of
    its class overlaps it with IoU > ``iou_threshold``. Returns the kept indices, best first;
    with ``max_keep`` only the first ``max_keep`` of them (the same boxes, found sooner: a box's
    fate depends only on the better boxes of its class).
    """
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices.numpy()
    b = boxes.detach().cpu().double().numpy()[order]
    lab = np.zeros(len(order), np.int64) if labels is None else \
        labels.detach().cpu().numpy()[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    alive = np.ones(len(order), bool)
    same = {c: np.flatnonzero(lab == c) for c in np.unique(lab)}  # positions, score order
    keep: list[int] = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = same[lab[i]]
        rest = rest[rest > i]
        rest = rest[alive[rest]]
        if rest.size:  # IoU of the kept box with the later boxes of its class
            iw = np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])
            ih = np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])
            inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
            union = area[i] + area[rest] - inter
            iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
            alive[rest[iou > iou_threshold]] = False
    return torch.as_tensor(order[np.array(keep, dtype=np.int64)], dtype=torch.long)


# ----------------------------------------------------------------------------- COCO mAP


def _match(ious: np.ndarray) -> np.ndarray:
    """COCO's greedy matching (``COCOeval.evaluateImg``) of score-sorted detections to the
    ground truth of one image and class, at every IoU threshold: ``matched`` bool [T, D].

    A detection takes, among the ground-truth boxes not yet matched at that threshold, the one
    of highest IoU provided it is >= the threshold; among equal IoUs the last one, as
    pycocotools (its ``if iou < best: continue`` lets an equal IoU replace the best).
    """
    t, (d, g) = len(IOU_THRESHOLDS), ious.shape
    matched = np.zeros((t, d), bool)
    if d == 0 or g == 0:
        return matched
    taken = np.zeros((t, g), bool)
    rows = np.arange(t)
    for i in range(d):
        cand = (ious[i][None, :] >= IOU_THRESHOLDS[:, None]) & ~taken
        vals = np.where(cand, ious[i][None, :], -1.0)
        j = g - 1 - vals[:, ::-1].argmax(1)  # the last of the largest
        ok = cand.any(1)
        taken[rows[ok], j[ok]] = True
        matched[ok, i] = True
    return matched


def coco_precision(detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   ground_truth: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int,
                   max_detections: int = 100) -> np.ndarray:
    """COCO's interpolated precision ``[T, R, K]`` (``COCOeval.accumulate``); −1 for a class
    without ground truth in the split.

    ``detections[i] = (boxes [D, 4], scores [D], labels [D])`` and ``ground_truth[i] = (boxes
    [G, 4], labels [G])`` per image. Per class: the detections of each image, best first
    (stable sort), at most ``max_detections`` per image and class, are matched greedily
    (:func:`_match`); all detections of the split are then sorted by score (stable, images in
    order) into cumulative precision/recall; precision is made non-increasing from the end and
    read at the 101 recall points (0 beyond the largest recall reached). Areas are all ("all"
    area range), no box is a crowd and none is ignored. A class with ground truth but no
    detection has precision 0; detections of a class without ground truth count nowhere
    (COCO leaves the class out).
    """
    T, R = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    precision = -np.ones((T, R, num_classes))
    for k in range(num_classes):
        scores, matches, n_gt = [], [], 0
        for (db, ds, dl), (gb, gl) in zip(detections, ground_truth):
            g = np.asarray(gb, np.float64).reshape(-1, 4)[np.asarray(gl) == k]
            sel = np.asarray(dl) == k
            s = np.asarray(ds, np.float64)[sel]
            order = np.argsort(-s, kind="mergesort")[:max_detections]
            d = np.asarray(db, np.float64).reshape(-1, 4)[sel][order]
            n_gt += len(g)
            scores.append(s[order])
            matches.append(_match(box_iou(d, g)))
        if n_gt == 0:
            continue
        s = np.concatenate(scores)
        m = np.concatenate(matches, axis=1)
        order = np.argsort(-s, kind="mergesort")
        tp = np.cumsum(m[:, order], axis=1).astype(np.float64)
        fp = np.cumsum(~m[:, order], axis=1).astype(np.float64)
        for t in range(T):
            nd = tp.shape[1]
            q = np.zeros(R)
            if nd:
                rc = tp[t] / n_gt
                pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
                pr = np.maximum.accumulate(pr[::-1])[::-1]
                idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                ok = idx < nd
                q[ok] = pr[idx[ok]]
            precision[t, :, k] = q
    return precision


def coco_map(detections, ground_truth, num_classes: int, max_detections: int = 100
             ) -> dict[str, float]:
    """``{"map50": ..., "map": ...}`` in percent (COCOeval.summarize's AP@0.5 and AP); NaN when
    the split has no ground-truth box. Arguments as :func:`coco_precision`."""
    p = coco_precision(detections, ground_truth, num_classes, max_detections)

    def mean(x: np.ndarray) -> float:
        x = x[x > -1]
        return 100.0 * float(x.mean()) if x.size else math.nan

    return {"map50": mean(p[0]), "map": mean(p)}


class DetectionMetric(Metric):
    """Keeps every image's decoded detections and ground truth; COCO mAP at the end."""

    def __init__(self, task: Detection) -> None:
        self.task = task
        self.detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.ground_truth: list[tuple[np.ndarray, np.ndarray]] = []

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.task.check_pred(pred, target)
        for det, (gb, gl) in zip(self.task.postprocess(pred), unpad(target)):
            self.detections.append((det["boxes"].double().cpu().numpy(),
                                    det["scores"].double().cpu().numpy(),
                                    det["labels"].cpu().numpy()))
            self.ground_truth.append((gb.double().cpu().numpy(), gl.cpu().numpy()))

    def compute(self) -> dict[str, float]:
        return coco_map(self.detections, self.ground_truth, self.task.num_classes,
                        self.task.max_detections)

    def state(self) -> dict[str, Any]:
        """Every image's detections and ground truth so far (NumPy arrays, picklable)."""
        return {"detections": list(self.detections), "ground_truth": list(self.ground_truth)}

    def merge(self, state: dict[str, Any]) -> None:
        """Append another shard's images after this one's. Several processes evaluate
        contiguous runs of the split, merged in rank order (engine/distributed.py), so the
        images keep the split's order and COCO's stable sort by score breaks ties between
        images exactly as one process does: the same mAP."""
        self.detections.extend(state["detections"])
        self.ground_truth.extend(state["ground_truth"])


# ----------------------------------------------------------------------------- the task


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Sum of the focal loss ``−α_t (1 − p_t)^γ log p_t`` (Lin et al. 2017, eq. 5)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t).pow(gamma) * ce).sum()


class Detection(Task):
    """FCOS-style object detection (see the module docstring); mAP@0.5 and mAP@[.5:.95] (%).

    Options are the published defaults: ``alpha`` 0.25 and ``gamma`` 2 (focal loss), ``prior``
    0.01, ``score_threshold`` 0.05, ``pre_nms`` 1000, ``nms_iou`` 0.6, ``max_detections`` 100
    (FCOS); ``box_scale`` (16 px) is ours: the distance a raw output of softplus⁻¹(1) means.
    KPI for DTP: ``map / 100``.
    """

    name = "detection"
    dense = True
    target_channels = None
    higher_is_better = {"map50": True, "map": True}
    primary_metrics = ("map50", "map")
    kpi_metric = "map"

    def __init__(self, num_classes: int = 10, alpha: float = 0.25, gamma: float = 2.0,
                 prior: float = 0.01, box_scale: float = 16.0, score_threshold: float = 0.05,
                 pre_nms: int = 1000, nms_iou: float = 0.6, max_detections: int = 100) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"task 'detection': num_classes must be a positive integer, got "
                              f"{num_classes!r}")
        if not 0 < prior < 1:
            raise ConfigError(f"task 'detection': prior must be in (0, 1), got {prior!r}")
        self.num_classes = num_classes
        self.channels = num_classes + 5
        self.alpha, self.gamma, self.box_scale = float(alpha), float(gamma), float(box_scale)
        self.prior_logit = math.log(prior / (1 - prior))
        self.score_threshold, self.nms_iou = float(score_threshold), float(nms_iou)
        self.pre_nms, self.max_detections = int(pre_nms), int(max_detections)

    # -------------------------------------------------------------- head output
    def split(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw output -> class logits [B,C,H,W] (prior added), distances [B,4,H,W] in pixels
        ``(l, t, r, b)``, centerness logits [B,H,W]."""
        c = self.num_classes
        logits = pred[:, :c] + self.prior_logit
        dist = F.softplus(pred[:, c : c + 4]) * self.box_scale
        return logits, dist, pred[:, c + 4]

    @staticmethod
    def locations(h: int, w: int, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel centres: ``xs`` [W] and ``ys`` [H] (``c + 0.5``, ``r + 0.5``)."""
        return (torch.arange(w, device=device, dtype=torch.float32) + 0.5,
                torch.arange(h, device=device, dtype=torch.float32) + 0.5)

    def assign(self, target: torch.Tensor, h: int, w: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FCOS targets at every location: class ``[B,H,W]`` (−1 negative), distances
        ``[B,4,H,W]`` to the assigned box (smallest area among the boxes holding the location)
        and the positive mask ``[B,H,W]``."""
        b, m = target.shape[:2]
        xs, ys = self.locations(h, w, target.device)
        if m == 0:
            neg = torch.full((b, h, w), -1, dtype=torch.long, device=target.device)
            return neg, torch.zeros(b, 4, h, w, device=target.device), neg >= 0
        x1, y1, x2, y2, cls = target.float().unbind(-1)  # [B, M]
        inside_x = (xs > x1[..., None]) & (xs < x2[..., None])  # [B, M, W]
        inside_y = (ys > y1[..., None]) & (ys < y2[..., None])  # [B, M, H]
        inside = inside_y[..., :, None] & inside_x[..., None, :]  # [B, M, H, W]
        area = torch.where(cls >= 0, (x2 - x1) * (y2 - y1), torch.inf)
        cost = torch.where(inside, area[..., None, None], torch.inf)
        best, idx = cost.min(1)  # [B, H, W]
        pos = torch.isfinite(best)
        box = target.float().gather(1, idx.reshape(b, -1, 1).expand(-1, -1, 5))  # [B, HW, 5]
        box = box.reshape(b, h, w, 5)
        gx, gy = xs.expand(h, w), ys[:, None].expand(h, w)
        dist = torch.stack([gx - box[..., 0], gy - box[..., 1], box[..., 2] - gx,
                            box[..., 3] - gy], 1)
        labels = torch.where(pos, box[..., 4].long(), -1)
        return labels, dist, pos

    # -------------------------------------------------------------- loss
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, dist, ctr = self.split(pred)
        b, c, h, w = logits.shape
        labels, tdist, pos = self.assign(target, h, w)
        onehot = F.one_hot(labels.clamp(min=0), c).permute(0, 3, 1, 2).to(logits.dtype)
        onehot = onehot * pos[:, None]
        n_pos = pos.sum()
        cls_loss = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma)
        cls_loss = cls_loss / n_pos.clamp(min=1)
        # positives only; masked by multiplication, so an image without objects adds exact 0s
        mask = pos.to(dist.dtype)
        tdist = torch.where(pos[:, None], tdist, torch.ones_like(tdist))  # finite everywhere
        lr, tb = tdist[:, [0, 2]], tdist[:, [1, 3]]
        centerness = torch.sqrt((lr.amin(1) / lr.amax(1)) * (tb.amin(1) / tb.amax(1)))
        pl, pt, pr, pb = dist.unbind(1)
        ql, qt, qr, qb = tdist.unbind(1)
        inter = (torch.minimum(pl, ql) + torch.minimum(pr, qr)) * (
            torch.minimum(pt, qt) + torch.minimum(pb, qb))
        union = (pl + pr) * (pt + pb) + (ql + qr) * (qt + qb) - inter
        iou_loss = -torch.log((inter + 1.0) / (union + 1.0))
        weight = centerness * mask
        reg_loss = (iou_loss * weight).sum() / weight.sum().clamp(min=1e-6)
        ctr_loss = F.binary_cross_entropy_with_logits(ctr, centerness, reduction="none")
        ctr_loss = (ctr_loss * mask).sum() / n_pos.clamp(min=1)
        return cls_loss + reg_loss + ctr_loss

    def loss_count(
        self, target: torch.Tensor, pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The positive locations of the batch at ``pred``'s resolution, at least 1: what
        :meth:`loss` divides its classification and centerness terms by (``n_pos.clamp(min=1)``).

        Several processes combine their losses weighted by these counts
        (engine/distributed.py): the focal and centerness terms of the global batch are then
        exact whenever every process holds a positive location; a process without one counts
        1, so its negatives still train (as they do in its own loss). The IoU term is divided
        by the sum of the positives' centerness instead, so it is combined by positive count
        too: close, not exact. Without ``pred`` the image size is taken as the boxes' extent.
        """
        if pred is not None:
            h, w = pred.shape[-2:]
        else:
            extent = target[..., 2:4].amax() if target.numel() else torch.zeros(())
            h = w = max(1, int(math.ceil(float(extent))))
        _, _, pos = self.assign(target, int(h), int(w))
        return pos.sum().clamp(min=1).float()

    # -------------------------------------------------------------- decoding
    @torch.no_grad()
    def postprocess(self, pred: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``{"boxes": float [N, 4] (x1, y1, x2, y2) pixels, "scores":
        [N], "labels": long [N]}``, best first, after per-class NMS (N <= max_detections)."""
        logits, dist, ctr = self.split(pred.float())
        b, c, h, w = logits.shape
        prob = torch.sigmoid(logits)
        score = torch.sqrt(prob * torch.sigmoid(ctr)[:, None])
        xs, ys = self.locations(h, w, pred.device)
        out = []
        for i in range(b):
            cand = (prob[i] > self.score_threshold).nonzero()  # [N, 3]: class, y, x
            s = score[i][cand[:, 0], cand[:, 1], cand[:, 2]]
            if len(s) > self.pre_nms:
                s, top = s.topk(self.pre_nms)
                cand = cand[top]
            cls, yy, xx = cand.unbind(1)
            d = dist[i][:, yy, xx]
            x, y = xs[xx], ys[yy]
            boxes = torch.stack([(x - d[0]).clamp(0, w), (y - d[1]).clamp(0, h),
                                 (x + d[2]).clamp(0, w), (y + d[3]).clamp(0, h)], 1)
            keep = nms(boxes, s, cls, self.nms_iou, self.max_detections).to(pred.device)
            out.append({"boxes": boxes[keep], "scores": s[keep], "labels": cls[keep]})
        return out

    def new_metric(self) -> DetectionMetric:
        return DetectionMetric(self)

    # -------------------------------------------------------------- checks
    def check_target(self, target: torch.Tensor, image: torch.Tensor) -> None:
        where = f"task {self.name!r}"
        img = tuple(image.shape)
        if isinstance(target, Boxes) or isinstance(target, (list, tuple)):
            raise DataError(f"{where}: the batch holds {type(target).__name__}, not the padded "
                            "[B, M, 5] tensor; batch with mtlcv.data.collate")
        if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.shape[-1] != 5 \
                or image.dim() != 4 or target.shape[0] != image.shape[0]:
            shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
            raise DataError(f"{where}: target shape {shape} is not the expected [B, M, 5] rows "
                            f"(x1, y1, x2, y2, class) for image {img}")
        if not target.dtype.is_floating_point:
            raise DataError(f"{where}: target dtype {target.dtype} is not a floating type for "
                            f"image {img}")
        for i, rows in enumerate(target.detach().cpu().double().numpy()):
            cls = rows[:, 4]
            if ((cls < 0) & (cls != PAD)).any():
                bad = cls[(cls < 0) & (cls != PAD)][0]
                raise DataError(f"{where}: image {i} has a box of class {bad:g}, outside "
                                f"[0, {self.num_classes}) and not the padding class {PAD}")
            rows = rows[cls != PAD]
            problems = check_boxes(rows[:, :4], rows[:, 4], self.num_classes, f"image {i}")
            if problems:
                raise DataError(f"{where}: {problems[0]}")

    def check_pred(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        want = (target.shape[0], self.channels)
        if pred.dim() != 4 or tuple(pred.shape[:2]) != want:
            raise DataError(f"task {self.name!r}: prediction shape {tuple(pred.shape)} is not "
                            f"[{want[0]}, {want[1]}, H, W] for target {tuple(target.shape)}")


@TASKS.register("detection")
def detection(num_classes: int = 10) -> Detection:
    """Object detection, FCOS-style: focal + IoU + centerness loss; mAP@0.5, mAP@[.5:.95] (%)."""
    return Detection(num_classes)
