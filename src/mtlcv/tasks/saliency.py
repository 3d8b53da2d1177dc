"""Saliency estimation, as in the dense-prediction survey (Vandenhende et al., TPAMI 2021) on
PASCAL-Context: a binary map per image, HED-style balanced cross-entropy, maxF and mIoU.

Target ``saliency``: float ``[B, 1, H, W]`` with 1 = salient, 0 = not, 255 = ignore.
Prediction: logits ``[B, 1, H, W]``.
"""

from __future__ import annotations

import torch

from ..registry import TASKS
from .base import Metric
from .edges import IGNORE, Edges

#: the survey's thresholds on the predicted probability (``SaliencyMeter``)
THRESHOLDS = torch.linspace(0.2, 0.9, 15)


class SaliencyMetric(Metric):
    """The survey's saliency metrics (``evaluation/eval_sal.py``), streamed over the split.

    For every threshold ``th`` in 0.2, 0.25, ..., 0.9 and every image: precision
    ``TP / (TP + FP + 1e-12)``, recall ``TP / (TP + FN + 1e-12)`` and the Jaccard index
    ``TP / (TP + FP + FN)`` (1 when both masks are empty) of ``sigmoid(logit) > th`` against the
    target, over non-ignored pixels. Per threshold, precision, recall and Jaccard are averaged
    over the images; ``maxF`` (%) is the largest ``2 P R / (P + R)`` over the thresholds
    (beta = 1, as in that code, not the beta^2 = 0.3 of the saliency literature) and ``miou``
    (%) the largest mean Jaccard. These are per-image averages by definition, so they are the
    survey's numbers exactly whatever the batch size.
    """

    def __init__(self, task: Saliency) -> None:
        self.task = task
        self.sums = torch.zeros(3, len(THRESHOLDS), dtype=torch.float64)  # prec, rec, jaccard
        self.n = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.task.check_pred(pred, target)
        p = torch.sigmoid(pred.double()).flatten(1)  # [B, HW]
        valid = (target != IGNORE).flatten(1)
        gt = (target == 1).flatten(1) & valid
        th = THRESHOLDS.to(p)[:, None, None]  # [K, 1, 1]
        m = (p[None] > th) & valid[None]  # [K, B, HW]
        tp = (m & gt[None]).sum(-1).double()
        fp = (m & ~gt[None]).sum(-1).double()
        fn = (~m & gt[None]).sum(-1).double()
        prec = tp / (tp + fp + 1e-12)
        rec = tp / (tp + fn + 1e-12)
        union = tp + fp + fn
        jac = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))
        self.sums += torch.stack([prec.sum(1), rec.sum(1), jac.sum(1)]).cpu()
        self.n += p.shape[0]

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {"maxF": float("nan"), "miou": float("nan")}
        prec, rec, jac = (self.sums / self.n).unbind(0)
        f = 2 * prec * rec / (prec + rec + 1e-12)
        return {"maxF": 100.0 * float(f.max()), "miou": 100.0 * float(jac.max())}


class Saliency(Edges):
    """Saliency: the balanced cross-entropy of :class:`~.edges.Edges` (the survey uses the same
    ``BalancedCrossEntropyLoss`` for both), scored by :class:`SaliencyMetric`. KPI for DTP:
    ``maxF / 100``."""

    name = "saliency"
    higher_is_better = {"maxF": True, "miou": True}
    primary_metrics = ("maxF", "miou")
    kpi_metric = "maxF"

    def __init__(self) -> None:
        super().__init__(threshold=0.5)

    def new_metric(self) -> SaliencyMetric:
        return SaliencyMetric(self)


@TASKS.register("saliency")
def saliency() -> Saliency:
    """Saliency: balanced BCE; maxF and mIoU (%) over thresholds, as the survey's evaluation."""
    return Saliency()
