"""Hard parameter sharing (Caruana, "Multitask Learning", Machine Learning 1997).

One backbone shared by every task and one head per task. The backbone's output is the shared
representation ``z``: ``encode(image) = z`` and ``decode(z, size) = {task: head_t(z)}``, so
balancers can take per-task gradients with respect to ``z`` instead of the shared parameters
(the MGDA-UB shortcut, Sener & Koltun 2018).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...registry import ARCHS
from ..base import MultiTaskModel
from ..build import build_backbone, build_head


@ARCHS.register("hps")
class HardSharing(MultiTaskModel):
    """Hard parameter sharing: one shared backbone, one head per task (Caruana 1997)."""

    has_representation = True

    def __init__(
        self, tasks: Mapping[str, Any], backbone: Mapping[str, Any], head: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.backbone = build_backbone(backbone)
        self.heads = nn.ModuleDict(
            {t: build_head(head, self.backbone.out_channels, task) for t, task in tasks.items()}
        )

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)

    def decode(self, rep: torch.Tensor, size: Sequence[int]) -> dict[str, torch.Tensor]:
        return {t: self.heads[t](rep, size) for t in self.tasks}
