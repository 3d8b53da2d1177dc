"""Edge detection: class-balanced BCE (HED), F-score at a fixed threshold over the split.

Target ``edges``: float ``[B, 1, H, W]`` with 1 = edge, 0 = no edge and 255 = ignore (ignored
pixels count in neither the loss nor the metrics). Prediction: logits ``[B, 1, H, W]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..registry import TASKS
from .base import Metric, Task

IGNORE = 255.0


class EdgeMetric(Metric):
    """Precision, recall and F1 (%) of ``sigmoid(logit) > threshold`` over the whole split.

    TP, FP and FN are counted over every non-ignored pixel of the split, so
    F = 2·TP / (2·TP + FP + FN). This is a pixel-exact F-score at one fixed threshold, not the
    BSDS ODS F-measure (which matches boundaries with a distance tolerance and sweeps the
    threshold); use it to compare models within this library. 0/0 counts as 0 (as sklearn).
    """

    def __init__(self, task: Edges) -> None:
        self.task = task
        self.counts = torch.zeros(3, dtype=torch.long)  # tp, fp, fn

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.task.check_pred(pred, target)
        valid = target != IGNORE
        p, t = self.task.postprocess(pred) & valid, (target == 1) & valid
        self.counts += torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]).cpu()

    def compute(self) -> dict[str, float]:
        tp, fp, fn = self.counts.tolist()
        div = lambda a, b: 100.0 * a / b if b else 0.0  # noqa: E731
        return {
            "fscore": div(2 * tp, 2 * tp + fp + fn),
            "precision": div(tp, tp + fp),
            "recall": div(tp, tp + fn),
        }


class Edges(Task):
    """Edge detection with the class-balanced cross-entropy of HED (Xie & Tu, ICCV 2015, eq. 2).

    Per batch, over non-ignored pixels Y: positives are weighted by β = |Y−|/|Y| and negatives
    by 1 − β = |Y+|/|Y|, and the weighted sum is divided by |Y| (a mean, so the loss scale does
    not grow with the image size). As in eq. 2, a batch without any edge pixel has β = 1 and
    contributes 0. Missing value: 255 (ignore). KPI for DTP: ``fscore / 100``.
    """

    name = "edges"
    channels = 1
    higher_is_better = {"fscore": True, "precision": True, "recall": True}
    primary_metrics = ("fscore", "precision", "recall")
    kpi_metric = "fscore"

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"task 'edges': threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        pos = (target == 1) & valid
        n_pos, n = pos.sum(), valid.sum()
        weight = torch.where(pos, n - n_pos, n_pos) * valid / n.clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(pred, pos.to(pred.dtype), reduction="none")
        return (weight * bce).sum() / n.clamp(min=1)

    def loss_count(
        self, target: torch.Tensor, pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        # the class-balancing weights use this batch's (this process's) edge ratio; across
        # processes the combination by valid pixels is therefore close, not exact
        return (target != IGNORE).sum().float()

    def new_metric(self) -> EdgeMetric:
        return EdgeMetric(self)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Binary edge map ``[B, 1, H, W]`` (bool): ``sigmoid(logit) > threshold``."""
        return torch.sigmoid(pred) > self.threshold

    def check_values(self, target: torch.Tensor) -> None:
        bad = target[(target != 0) & (target != 1) & (target != IGNORE)]
        if bad.numel():
            raise DataError(
                f"task 'edges': target value {float(bad[0]):g} is not 0, 1 or the ignore value 255"
            )


@TASKS.register("edges")
def edges(threshold: float = 0.5) -> Edges:
    """Edge detection: class-balanced BCE (HED); F-score, precision, recall (%) at a threshold."""
    return Edges(threshold)
