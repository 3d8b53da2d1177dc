"""Single-task learning: an independent network (backbone + head) per task.

The single-task baselines against which multi-task models are measured (Δm, Maninis et al.
2019; Vandenhende et al. 2021). Keeping all of them in one module trained on the summed loss
is the same as training each separately: no parameter, buffer or BatchNorm statistic is shared,
so the gradient of ``sum_t L_t`` restricted to network ``t`` is the gradient of ``L_t`` (with
Adam/SGD, whose updates are per parameter, the runs coincide step for step).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...registry import ARCHS
from ..base import MultiTaskModel
from ..build import build_backbone, build_head


class SingleTaskNet(nn.Module):
    """One task's network: its own backbone and head."""

    def __init__(self, task: Any, backbone: Mapping[str, Any], head: Mapping[str, Any]) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone)
        self.head = build_head(head, self.backbone.out_channels, task)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(image), image.shape[-2:])


@ARCHS.register("stl")
class SingleTask(MultiTaskModel):
    """One independent backbone + head per task (the single-task baselines)."""

    has_representation = False

    def __init__(
        self, tasks: Mapping[str, Any], backbone: Mapping[str, Any], head: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.nets = nn.ModuleDict(
            {t: SingleTaskNet(task, backbone, head) for t, task in tasks.items()}
        )

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.nets[task].parameters()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: self.nets[t](image) for t in self.tasks}
