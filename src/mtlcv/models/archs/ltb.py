"""Learning to Branch (Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML
2020, sec. 3).

A tree-structured design space over the backbone's stages: every stage has T nodes (one copy of
that stage each, T = the number of tasks, as in LibMTL's implementation), stage 0's nodes read the
image, and each node of a later stage picks its *parent* among the previous stage's nodes by
sampling a categorical distribution with learned logits through Gumbel-softmax (Jang et al.
2017) with straight-through one-hot samples, so the branching structure is trained end to end
with the weights; task ``t``'s head reads node ``t`` of the last stage. Once trained, the tree is
the argmax parent of every node (:meth:`LearningToBranch.branching`); evaluation (``eval()``)
always uses it, so predictions are deterministic.

Schedule. LibMTL's port (the paper publishes no code) uses, per epoch ``e`` of ``E``, a warm-up
of ``E/100`` epochs in which every node reads the *sum* of all parents, then the temperature
``tau = (E/20) / sqrt(e + 1)``. A model does not see epochs, so the schedule here runs on its own
count of training forward passes ``k`` (a buffer, saved in checkpoints): ``warmup_steps`` with
every node reading the *mean* of its parents (the sum would scale features by T), then
``tau_k = tau / sqrt(1 + (k - warmup_steps) / decay_steps)``. Defaults ``tau = 5`` (LibMTL's start
for 100 epochs), ``decay_steps = 100`` and ``warmup_steps = 100`` (LibMTL's per-epoch decay and one
warm-up epoch, at 100 steps per epoch) are ours.

Parameters: every node below the last stage may feed any task, so the copies' lower stages and
the branching logits are shared; task ``t`` owns node ``t`` of the last stage and its head.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import ARCHS
from ..base import MultiTaskModel
from ..build import build_backbone, build_head
from .ple import _stage_parameters


@ARCHS.register("ltb")
class LearningToBranch(MultiTaskModel):
    """Backbone copies branching by learned Gumbel-softmax parent choices (Guo et al. 2020)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        tau: float = 5.0,
        decay_steps: int = 100,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        T = len(self.tasks)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
            raise ConfigError(f"model.options.tau: got {tau!r}, expected a number > 0")
        for key, v, low in (("decay_steps", decay_steps, 1), ("warmup_steps", warmup_steps, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"model.options.{key}: got {v!r}, expected an integer >= {low}")
        self.tau, self.decay_steps, self.warmup_steps = float(tau), decay_steps, warmup_steps
        self.nodes = nn.ModuleList(build_backbone(backbone) for _ in range(T))
        bb = self.nodes[0]
        self.num_stages = bb.num_stages
        self.logits = nn.Parameter(torch.zeros(max(self.num_stages - 1, 0), T, T))
        self.heads = nn.ModuleDict(
            {t: build_head(head, bb.out_channels, task) for t, task in tasks.items()})
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        ids = {id(p) for p in _stage_parameters(bb, self.num_stages - 1)}
        self._last = frozenset(k for k, p in bb.named_parameters() if id(p) in ids)

    def temperature(self) -> float:
        k = max(int(self.steps) - self.warmup_steps, 0)
        return self.tau / (1.0 + k / self.decay_steps) ** 0.5

    def branching(self) -> list[list[int]]:
        """The learned tree: for every stage after the first, each node's parent index."""
        return self.logits.argmax(-1).tolist()

    def _choices(self) -> torch.Tensor:
        """``[stages-1, T, T]``: each node's weights over the previous stage's nodes."""
        T = len(self.tasks)
        if not self.training:
            return F.one_hot(self.logits.argmax(-1), T).to(self.logits.dtype)
        if int(self.steps) < self.warmup_steps:
            # the mean of the parents; through the logits (times 0) so that they get a (zero)
            # gradient like every other parameter, as an optimizer expects
            return torch.softmax(self.logits * 0.0, -1)
        return F.gumbel_softmax(self.logits, tau=self.temperature(), hard=True, dim=-1)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield self.logits
        for node in self.nodes:
            yield from (p for n, p in node.named_parameters() if n not in self._last)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        node = self.nodes[self.tasks.index(task)]
        yield from (p for n, p in node.named_parameters() if n in self._last)
        yield from self.heads[task].parameters()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self._choices()
        if self.training:
            self.steps += 1
        xs = [node.forward_stage(image, 0) for node in self.nodes]
        for j in range(1, self.num_stages):
            prev = torch.stack(xs, 1)  # [B, T, C, h, w]
            xs = [node.forward_stage(
                torch.einsum("j,bj...->b...", a[j - 1, n].to(prev.dtype), prev), j)
                for n, node in enumerate(self.nodes)]
        return {t: self.heads[t](x, image.shape[-2:]) for t, x in zip(self.tasks, xs)}
