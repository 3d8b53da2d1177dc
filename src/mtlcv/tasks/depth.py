"""Monocular depth estimation: L1 loss, absolute / relative / RMS error and δ1 over the split.

Target ``depth``: float ``[B, 1, H, W]`` in metres; 0 (or any non-positive or NaN value) marks a
missing pixel, which counts in neither the loss nor the metrics. Prediction: ``[B, 1, H, W]``.
"""

from __future__ import annotations

import math

import torch

from ..registry import TASKS
from .base import Metric, Task, masked_mean, ratio


class DepthMetric(Metric):
    """Depth errors over ALL valid pixels of the split (Eigen et al., NIPS 2014, Sec. 4).

    ``abs_err`` = mean |p − t| (m), ``rel_err`` = mean |p − t| / t, ``rmse`` = sqrt(mean (p − t)²)
    (m), ``delta1`` = % of pixels with max(p / t, t / p) < 1.25. Each is one mean over every valid
    pixel of the split, not a mean of per-image or per-batch values. (mtan's ``depth_error``,
    copied by CAGrad, Nash-MTL and FAMO, computes ``abs_err`` and ``rel_err`` per evaluation
    batch and its trainers average the batches: that is ``eval.protocol: published``, which
    applies this metric batch by batch, see ``published_aggregation``.) Predictions are used raw
    (no clamping): δ1 is evaluated as ``p < 1.25 t and t < 1.25 p``, which equals the ratio test
    for p > 0 and never counts a non-positive prediction as correct.
    """

    def __init__(self, task: Depth) -> None:
        self.task = task
        self.sums = torch.zeros(5, dtype=torch.float64)  # abs, rel, sq, delta1, count

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.task.check_pred(pred, target)
        valid = target > 0
        p, t = pred[valid].double(), target[valid].double()
        err = (p - t).abs()
        delta1 = (p < 1.25 * t) & (t < 1.25 * p)
        row = [err.sum(), (err / t).sum(), err.square().sum(), delta1.sum(), valid.sum()]
        self.sums += torch.stack([v.double() for v in row]).cpu()

    def compute(self) -> dict[str, float]:
        abs_sum, rel_sum, sq_sum, d1, n = self.sums.tolist()
        mse = ratio(sq_sum, n, 1.0)
        return {
            "abs_err": ratio(abs_sum, n, 1.0),
            "rel_err": ratio(rel_sum, n, 1.0),
            "rmse": math.sqrt(mse) if n > 0 else math.nan,
            "delta1": ratio(d1, n),
        }


class Depth(Task):
    """Depth regression with the L1 loss on valid pixels (as in mtan, Liu et al., CVPR 2019).

    Missing value: 0 (non-positive and NaN targets are treated as missing too). KPI for DTP:
    ``delta1 / 100``, the only bounded higher-is-better depth metric (errors are unbounded).
    """

    name = "depth"
    channels = 1
    published_aggregation = "batch_mean"
    higher_is_better = {"abs_err": False, "rel_err": False, "rmse": False, "delta1": True}
    primary_metrics = ("abs_err", "rel_err", "rmse", "delta1")
    kpi_metric = "delta1"

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target > 0
        # replace missing targets so NaN there cannot leak into the masked sum or its gradient
        target = torch.where(valid, target, pred.detach())
        return masked_mean((pred - target).abs(), valid)

    def loss_count(
        self, target: torch.Tensor, pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (target > 0).sum().float()

    def new_metric(self) -> DepthMetric:
        return DepthMetric(self)


@TASKS.register("depth")
def depth() -> Depth:
    """Depth estimation: L1 loss; abs_err (m), rel_err, rmse (m), delta1 (%)."""
    return Depth()
