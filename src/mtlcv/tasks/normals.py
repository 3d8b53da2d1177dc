"""Surface normal estimation: cosine loss, angular error statistics with an exact median.

Target ``normals``: float ``[B, 3, H, W]`` unit vectors in the camera frame (x right, y down,
z forward); an all-zero vector marks a missing pixel, which counts in neither the loss nor the
metrics. Prediction: ``[B, 3, H, W]``, unnormalised (the task normalises it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..registry import TASKS
from .base import Metric, Task, masked_mean, ratio

THRESHOLDS = (11.25, 22.5, 30.0)


# Why not ``x.norm(dim=1)`` / ``F.normalize(x, dim=1)``: on the CPU, PyTorch 2.13's vector norm
# over the channel axis of a [B, 3, H, W] tensor is ~40x slower than the sum of squares (a
# strided reduction: 28 ms vs 0.6 ms for 8x3x96x128, one thread), and the normals loss took
# four of them per step: half the demo's training step (docs/performance.md).
def channel_norm(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The L2 norm over dim 1, as ``x.norm(dim=1)``."""
    return (x * x).sum(1, keepdim=keepdim).sqrt()


def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=1, eps=eps)``: ``x / max(|x|, eps)``; below ``eps`` the gradient of
    the norm is 0 (the clamp), as ``F.normalize``'s is."""
    return x / (x * x).sum(1, keepdim=True).clamp_min(eps * eps).sqrt()


def valid_mask(target: torch.Tensor) -> torch.Tensor:
    """Pixels whose target vector is not all zero (a NaN vector is not valid either)."""
    return (target * target).sum(1) > 0


def angles_deg(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between vectors along dim 1, via atan2(|p × t|, p · t).

    atan2 keeps full precision for small angles, where acos of a rounded cosine loses half of
    the digits; a zero prediction gets 90° (what acos of the normalised dot product gives).
    """
    p, t = pred.double(), target.double()
    ang = torch.rad2deg(torch.atan2(channel_norm(torch.linalg.cross(p, t, dim=1)),
                                    (p * t).sum(1)))
    return torch.where(valid_mask(p), ang, torch.full_like(ang, 90.0))


def exact_median(chunks: list[np.ndarray]) -> float:
    """``np.median`` of the concatenation of ``chunks``, without concatenating them.

    One histogram pass locates the bin holding each middle rank; only that bin's values are
    gathered and partitioned. The bin index is a monotone function of the value, so the bins
    split the sorted order into contiguous runs and the result is exact. Peak extra memory is
    one chunk plus one bin, which matters for full-resolution NYUv2 (~2·10⁸ angles).
    """
    chunks = [c for c in chunks if c.size]
    n = sum(c.size for c in chunks)
    if n == 0:
        return math.nan
    lo = min(c.min() for c in chunks)
    hi = max(c.max() for c in chunks)
    if lo == hi:
        return float(lo)
    nbins = 4096
    scale = nbins / (float(hi) - float(lo))

    def bin_of(c: np.ndarray) -> np.ndarray:
        return np.minimum(((c.astype(np.float64) - float(lo)) * scale).astype(np.int64), nbins - 1)

    counts = sum(np.bincount(bin_of(c), minlength=nbins) for c in chunks)
    ends = np.cumsum(counts)

    def kth(k: int) -> float:
        b = int(np.searchsorted(ends, k, side="right"))  # first bin whose run reaches rank k
        values = np.concatenate([c[bin_of(c) == b] for c in chunks])
        j = k - int(ends[b] - counts[b])
        return float(np.partition(values, j)[j])

    return 0.5 * (kth((n - 1) // 2) + kth(n // 2))


class AngleMetric(Metric):
    """Angular error between predicted and true normals (Eigen & Fergus, ICCV 2015, Table 3).

    ``mean`` and ``median`` (degrees) and ``within_11.25``, ``within_22.5``, ``within_30`` (% of
    pixels with error below the threshold), all over every valid pixel of the split. The median
    is exact: the angles are kept as float32 chunks on the host and the median is taken at
    :meth:`compute` (:func:`exact_median`); the other statistics are float64 running sums.
    (mtan's ``normal_error``, copied by CAGrad, Nash-MTL and FAMO, computes these per evaluation
    batch, the median too, and averages the batches: ``eval.protocol: published``.)
    """

    def __init__(self, task: Normals) -> None:
        self.task = task
        self.chunks: list[np.ndarray] = []
        self.sums = torch.zeros(2 + len(THRESHOLDS), dtype=torch.float64)  # sum, n, within...

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.task.check_pred(pred, target)
        ang = angles_deg(pred, target)[valid_mask(target)]
        row = [ang.sum(), torch.tensor(ang.numel())] + [(ang < th).sum() for th in THRESHOLDS]
        self.sums += torch.stack([v.double().cpu() for v in row])
        self.chunks.append(ang.float().cpu().numpy())

    def compute(self) -> dict[str, float]:
        total, n, *within = self.sums.tolist()
        out = {"mean": ratio(total, n, 1.0), "median": exact_median(self.chunks)}
        for th, count in zip(THRESHOLDS, within):
            out[f"within_{th:g}"] = ratio(count, n)
        return out


class Normals(Task):
    """Surface normals with the cosine loss 1 − cos(p, t) on valid pixels.

    The loss is the negative cosine similarity used for normals by mtan (Liu et al., CVPR 2019)
    and Eigen & Fergus (ICCV 2015), shifted by 1 so a perfect prediction scores 0; it is
    invariant to the scale of the prediction. Missing value: an all-zero target vector.
    KPI for DTP: ``within_30 / 100`` (bounded, higher is better; angles are unbounded errors).
    """

    name = "normals"
    channels = 3
    published_aggregation = "batch_mean"
    target_channels = 3
    higher_is_better = {
        "mean": False,
        "median": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    primary_metrics = ("mean", "median", "within_11.25", "within_22.5", "within_30")
    kpi_metric = "within_30"

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cos = (unit(pred) * unit(target)).sum(1)
        return masked_mean(1.0 - cos, valid_mask(target))

    def loss_count(
        self, target: torch.Tensor, pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        return valid_mask(target).sum().float()

    def new_metric(self) -> AngleMetric:
        return AngleMetric(self)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Unit normals ``[B, 3, H, W]`` (L2 normalisation over the channel axis)."""
        return unit(pred)


@TASKS.register("normals")
def normals() -> Normals:
    """Surface normals: cosine loss; mean/median angle (deg), % within 11.25/22.5/30 deg."""
    return Normals()
