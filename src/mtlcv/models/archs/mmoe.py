"""Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018, sec. 4.3 and eq. 5-6).

``num_experts`` experts, each a whole backbone (``model.backbone``, as in LibMTL's image
version), are shared by all tasks; task ``t`` has its own gate, a softmax over the experts
computed from the input, and its head reads the gated sum of the experts' outputs::

    f^t(x) = sum_e g^t(x)_e f_e(x),   g^t(x) = softmax(W_t x)        (eq. 5-6)

Gates on images. The paper's gate is linear in the input features; LibMTL's image version feeds
the whole flattened image to the linear layer (``3 H W`` inputs per expert, tied to one image
size). Here the gate reads the input average-pooled to ``gate_pool`` (default ``[8, 8]``:
``3·64`` inputs) and flattened, which works at any resolution; ``gate_pool`` equal to the image
size is LibMTL's gate exactly. Gates are per sample, as in the paper.

Parameters: shared = the experts; task ``t`` = its gate and head. No single shared
representation (each task reads its own mixture).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import ARCHS
from ..base import MultiTaskModel
from ..build import build_backbone, build_head


def check_count(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.options.{key}: got {value!r}, expected an integer >= {minimum}")
    return value


def check_pool(value: Any) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ConfigError(f"model.options.gate_pool: got {value!r}, expected [h, w] (positive "
                          "integers)")
    return int(value[0]), int(value[1])


def build_experts(
    backbone: Mapping[str, Any], tasks: Sequence[str], num_shared: Any, num_specific: Any
) -> tuple[nn.ModuleList, nn.ModuleDict]:
    """CGC's and PLE's experts, checked: ``num_shared`` shared backbones and, per task,
    ``num_specific`` of its own (0 allowed)."""
    S = check_count(num_shared, "num_shared")
    K = check_count(num_specific, "num_specific", 0)
    shared = nn.ModuleList(build_backbone(backbone) for _ in range(S))
    specific = nn.ModuleDict(
        {t: nn.ModuleList(build_backbone(backbone) for _ in range(K)) for t in tasks})
    return shared, specific


class Gate(nn.Module):
    """``softmax(W pool(x))``: a per-sample distribution over ``num_outputs`` experts."""

    def __init__(self, in_channels: int, num_outputs: int, pool: Sequence[int]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(tuple(pool))
        self.linear = nn.Linear(in_channels * pool[0] * pool[1], num_outputs)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


def mix(weights: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_e weights[:, e] * experts[e]`` for per-sample weights ``[B, E]``."""
    stacked = torch.stack(list(experts), 1)  # [B, E, C, h, w]
    shape = (*weights.shape, *([1] * (stacked.dim() - 2)))
    return (weights.reshape(shape).to(stacked.dtype) * stacked).sum(1)


class ExpertMixture(MultiTaskModel):
    """Shared expert backbones mixed per task by a gate: ``self.experts`` (shared), and per task
    ``self.gates[t]`` (image -> weights ``[B, E]``) and ``self.heads[t]``. MMoE and DSelect-k
    differ only in their gates."""

    has_representation = False
    tasks: list[str]
    experts: nn.ModuleList
    gates: nn.ModuleDict
    heads: nn.ModuleDict

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.experts.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.gates[task].parameters()
        yield from self.heads[task].parameters()

    def gate_weights(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per task, the experts' weights ``[B, E]`` for ``image``."""
        return {t: self.gates[t](image) for t in self.tasks}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = [e(image) for e in self.experts]
        weights = self.gate_weights(image)
        size = image.shape[-2:]
        return {t: self.heads[t](mix(weights[t], feats), size) for t in self.tasks}


@ARCHS.register("mmoe")
class MMoE(ExpertMixture):
    """Shared expert backbones mixed per task by a softmax gate (Ma et al., KDD 2018)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        num_experts: int = 3,
        gate_pool: Sequence[int] = (8, 8),
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        E = check_count(num_experts, "num_experts")
        pool = check_pool(gate_pool)
        self.experts = nn.ModuleList(build_backbone(backbone) for _ in range(E))
        C = self.experts[0].out_channels
        self.gates = nn.ModuleDict({t: Gate(3, E, pool) for t in self.tasks})
        self.heads = nn.ModuleDict({t: build_head(head, C, task) for t, task in tasks.items()})

