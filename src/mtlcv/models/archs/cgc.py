"""Customized Gate Control (Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020, sec. 4.2, eq. 2-4).

MMoE with experts split into ``num_shared`` shared ones and ``num_specific`` per task: task
``t``'s gate mixes the shared experts and task ``t``'s own experts only,

    g^t(x) = softmax(W_t x),  y^t = head_t( sum_e g^t(x)_e S^t(x)_e ),  S^t = [E_t ; E_shared]

so a task's own experts never see another task's gradient. Experts are whole backbones and gates
read the average-pooled input, as in :mod:`.mmoe` (LibMTL's CGC feeds the flattened image).
``num_specific: 0`` is MMoE with ``num_shared`` experts.

Parameters: shared = the shared experts; task ``t`` = its experts, gate and head.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...registry import ARCHS
from ..base import MultiTaskModel
from ..build import build_head
from .mmoe import Gate, build_experts, check_pool, mix


@ARCHS.register("cgc")
class CGC(MultiTaskModel):
    """Shared and task-specific expert backbones, one gate per task (Tang et al., RecSys 2020)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        num_shared: int = 1,
        num_specific: int = 1,
        gate_pool: Sequence[int] = (8, 8),
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.shared, self.specific = build_experts(backbone, self.tasks, num_shared, num_specific)
        S, K = len(self.shared), len(next(iter(self.specific.values())))
        pool = check_pool(gate_pool)
        C = self.shared[0].out_channels
        self.gates = nn.ModuleDict({t: Gate(3, K + S, pool) for t in self.tasks})
        self.heads = nn.ModuleDict({t: build_head(head, C, task) for t, task in tasks.items()})

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.shared.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.specific[task].parameters()
        yield from self.gates[task].parameters()
        yield from self.heads[task].parameters()

    def gate_weights(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per task, the weights ``[B, K + S]`` of its own experts, then the shared ones."""
        return {t: self.gates[t](image) for t in self.tasks}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = [e(image) for e in self.shared]
        weights = self.gate_weights(image)
        out = {}
        for t in self.tasks:
            own = [e(image) for e in self.specific[t]]
            out[t] = self.heads[t](mix(weights[t], own + shared), image.shape[-2:])
        return out
