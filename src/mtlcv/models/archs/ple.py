"""Progressive Layered Extraction (Tang, Liu, Zhao & Gong, RecSys 2020, sec. 4.3, eq. 5-6).

CGC stacked over the backbone's stages: at every stage ``j`` (an *extraction layer*) each task
has ``num_specific`` experts and ``num_shared`` experts serve everyone, every expert being stage
``j`` of its own copy of the backbone (``forward_stage``, so any stage-exposing backbone works).
Task ``t``'s experts read ``t``'s gated features of the previous stage, the shared experts read
the shared gated features; then

    x_t^j = softmax(W_t^j x_t^(j-1)) . [E_t^j(x_t^(j-1)) ; E_s^j(x_s^(j-1))]          (eq. 5)
    x_s^j = softmax(W_s^j x_s^(j-1)) . [E_1^j ; ... ; E_T^j ; E_s^j]   (all experts, eq. 6)

with ``x_t^0 = x_s^0`` = the image; the last stage has no shared gate, and task ``t``'s head reads
``x_t`` of the last stage. Gates read their path's input average-pooled to ``gate_pool``
(see :mod:`.mmoe`).

Departure of LibMTL's PLE (``LibMTL/architecture/PLE.py``): it has no shared gate; the shared
experts of each level are run once per task on that task's features instead. We follow the
paper, which also runs every expert once per forward.

Parameters: a task's experts and gates below the last stage feed the shared gate, hence every
task; so shared = every expert and gate except the last stage's task-specific ones, and task
``t`` = its last-stage experts, its last-stage gate and its head.
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


@ARCHS.register("ple")
class PLE(MultiTaskModel):
    """CGC at every backbone stage, shared gates between stages (Tang et al., RecSys 2020)."""

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
        bb = self.shared[0]
        n = bb.num_stages
        ins = [3, *bb.stage_channels[:-1]]  # each stage's input channels
        T = len(self.tasks)
        self.task_gates = nn.ModuleDict(
            {t: nn.ModuleList(Gate(ins[j], K + S, pool) for j in range(n)) for t in self.tasks})
        self.shared_gates = nn.ModuleList(Gate(ins[j], T * K + S, pool) for j in range(n - 1))
        self.heads = nn.ModuleDict(
            {t: build_head(head, bb.out_channels, task) for t, task in tasks.items()})
        self.num_stages = n
        # names (not ids: copies and replicas stay right) of an expert's last-stage parameters
        ids = {id(p) for p in _stage_parameters(bb, n - 1)}
        self._last = frozenset(k for k, p in bb.named_parameters() if id(p) in ids)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.shared.parameters()
        yield from self.shared_gates.parameters()
        last = self.num_stages - 1
        for t in self.tasks:
            for g in list(self.task_gates[t])[:last]:
                yield from g.parameters()
            for e in self.specific[t]:
                yield from (p for n, p in e.named_parameters() if n not in self._last)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        last = self.num_stages - 1
        for e in self.specific[task]:
            yield from (p for n, p in e.named_parameters() if n in self._last)
        yield from self.task_gates[task][last].parameters()
        yield from self.heads[task].parameters()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        xt = {t: image for t in self.tasks}
        xs = image
        for j in range(self.num_stages):
            shared = [e.forward_stage(xs, j) for e in self.shared]
            own = {t: [e.forward_stage(xt[t], j) for e in self.specific[t]] for t in self.tasks}
            new = {t: mix(self.task_gates[t][j](xt[t]), own[t] + shared) for t in self.tasks}
            if j < self.num_stages - 1:
                every = [f for t in self.tasks for f in own[t]] + shared
                xs = mix(self.shared_gates[j](xs), every)
            xt = new
        return {t: self.heads[t](xt[t], image.shape[-2:]) for t in self.tasks}


def _stage_parameters(bb: nn.Module, stage: int) -> list[nn.Parameter]:
    """The parameters stage ``stage`` of a backbone uses (its module, or the callable's owner)."""
    st = bb.stages[stage]
    if isinstance(st, nn.Module):
        return list(st.parameters())
    # ResNet's stem is a bound method over conv1/bn1: the parameters not in any other stage
    others = {id(p) for i, s in enumerate(bb.stages) if i != stage and isinstance(s, nn.Module)
              for p in s.parameters()}
    return [p for p in bb.parameters() if id(p) not in others]
