"""Image classification (e.g. scene type): cross-entropy, accuracy over the split.

Target ``classification``: long ``[B]`` with class ids in ``[0, num_classes)``; 255 marks an
image without a label (the dataset contract's fill value), which counts in neither the loss
nor the metric. Prediction: logits ``[B, num_classes]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import TASKS
from .base import Metric, Task, ratio
from .segmentation import check_labels

IGNORE = 255


class AccuracyMetric(Metric):
    """Top-1 accuracy (%): correct / labelled images over the whole split."""

    def __init__(self, task: Classification) -> None:
        self.task = task
        self.counts = torch.zeros(2, dtype=torch.long)  # correct, labelled

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.task.check_pred(pred, target)
        valid = target != IGNORE
        correct = (self.task.postprocess(pred) == target) & valid
        self.counts += torch.stack([correct.sum(), valid.sum()]).cpu()

    def compute(self) -> dict[str, float]:
        correct, n = self.counts.tolist()
        return {"accuracy": ratio(correct, n)}


class Classification(Task):
    """Image-level classification with the cross-entropy loss over labelled images.

    Missing value: 255 (no label). KPI for DTP: ``accuracy / 100`` (as in Guo et al. 2018).
    """

    name = "classification"
    dense = False
    integer_target = True
    higher_is_better = {"accuracy": True}
    primary_metrics = ("accuracy",)
    kpi_metric = "accuracy"

    def __init__(self, num_classes: int = 10) -> None:
        if not 2 <= num_classes <= IGNORE:
            raise ConfigError(
                f"task 'classification': num_classes must be in [2, {IGNORE}], got {num_classes}"
            )
        self.num_classes = self.channels = num_classes

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(pred, target.long(), ignore_index=IGNORE, reduction="sum")
        return total / (target != IGNORE).sum().clamp(min=1)

    def loss_count(
        self, target: torch.Tensor, pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (target != IGNORE).sum().float()

    def new_metric(self) -> AccuracyMetric:
        return AccuracyMetric(self)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Predicted class ``[B]`` (argmax of the logits)."""
        return pred.argmax(1)

    def check_values(self, target: torch.Tensor) -> None:
        check_labels(self.name, target, self.num_classes, IGNORE)


@TASKS.register("classification")
def classification(num_classes: int = 10) -> Classification:
    """Image classification: cross-entropy; accuracy (%)."""
    return Classification(num_classes)
