"""Semantic segmentation: per-pixel cross-entropy, mIoU from one confusion matrix.

Target ``semseg``: long ``[B, H, W]`` with class ids in ``[0, num_classes)``; pixels labelled
``ignore_index`` (255) are unlabelled and count in neither the loss nor the metrics.
Prediction: logits ``[B, num_classes, H, W]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..registry import TASKS
from .base import Metric, Task, ratio


class ConfusionMetric(Metric):
    """Confusion matrix accumulated over the whole split (rows: target, columns: prediction).

    ``miou`` (%): mean over classes of IoU_c = TP_c / (TP_c + FP_c + FN_c) (Everingham et al.,
    PASCAL VOC, IJCV 2010), computed once from the split's confusion matrix, like mtan's
    ``ConfMatrix`` (since its Nov. 2020 update; CAGrad, Nash-MTL and FAMO copy it, so the
    published protocol uses this metric too). Classes with an empty union (absent from the
    targets AND never predicted) are left out of the mean; mtan's ``ConfMatrix`` instead gets
    0/0 = NaN for such a class, and so a NaN mIoU, so the two agree exactly when every class
    occurs or is predicted (as on NYUv2's 654 test images). A class that is predicted but never
    in the target counts with IoU 0 in both. ``pixel_acc`` (%): correctly labelled / labelled
    pixels.
    """

    def __init__(self, task: Segmentation) -> None:
        self.task = task
        c = task.num_classes
        self.cm = torch.zeros(c * c, dtype=torch.long)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.task.check_pred(pred, target)
        c = self.task.num_classes
        label = self.task.postprocess(pred)
        valid = target != self.task.ignore_index
        idx = target[valid].long() * c + label[valid]  # long: uint8 labels would overflow
        self.cm += torch.bincount(idx, minlength=c * c).cpu()

    def compute(self) -> dict[str, float]:
        c = self.task.num_classes
        cm = self.cm.view(c, c).double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        miou = ratio((tp[present] / union[present]).sum().item(), int(present.sum()))
        return {"miou": miou, "pixel_acc": ratio(tp.sum().item(), cm.sum().item())}


class Segmentation(Task):
    """Semantic segmentation (e.g. NYUv2-13 / NYUv2-40); loss: cross-entropy over labelled pixels.

    Missing value: ``ignore_index`` (255) marks unlabelled pixels. KPI for DTP: ``miou / 100``
    (the metric the DTP paper and the MTL literature report for segmentation).
    """

    channels: int
    target_channels = None
    integer_target = True
    higher_is_better = {"miou": True, "pixel_acc": True}
    primary_metrics = ("miou", "pixel_acc")
    kpi_metric = "miou"

    def __init__(self, num_classes: int = 13, ignore_index: int = 255) -> None:
        if num_classes < 2:
            raise ConfigError(f"task 'semseg': num_classes must be >= 2, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"task 'semseg': ignore_index {ignore_index} collides with a class id "
                f"(num_classes {num_classes})"
            )
        self.name = "semseg"
        self.num_classes = self.channels = num_classes
        self.ignore_index = ignore_index

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # sum / count instead of reduction="mean": an all-ignored batch gives 0, not NaN
        total = F.cross_entropy(
            pred, target.long(), ignore_index=self.ignore_index, reduction="sum"
        )
        return total / (target != self.ignore_index).sum().clamp(min=1)

    def loss_count(
        self, target: torch.Tensor, pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (target != self.ignore_index).sum().float()

    def new_metric(self) -> ConfusionMetric:
        return ConfusionMetric(self)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Class map ``[B, H, W]`` (argmax of the logits)."""
        return pred.argmax(1)

    def check_values(self, target: torch.Tensor) -> None:
        check_labels(self.name, target, self.num_classes, self.ignore_index)


def check_labels(task: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise DataError naming the first label outside ``[0, num_classes)`` that is not ignored."""
    bad = target[(target != ignore_index) & ((target < 0) | (target >= num_classes))]
    if bad.numel():
        raise DataError(
            f"task {task!r}: label {int(bad[0])} is outside [0, {num_classes}) and is not the "
            f"ignore value {ignore_index}"
        )


@TASKS.register("semseg")
def semseg(num_classes: int = 13, ignore_index: int = 255) -> Segmentation:
    """Semantic segmentation: cross-entropy; mIoU (%) and pixel accuracy (%)."""
    return Segmentation(num_classes, ignore_index)
