"""PAD-Net (Xu, Ouyang, Wang & Sebe, "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation
Network for Simultaneous Depth Estimation and Scene Parsing", CVPR 2018, Sec. 3).

backbone -> per task: two 3x3 conv-BN-ReLU layers giving its intermediate features ``F_k``
and a 1x1 intermediate prediction (deep supervision, Sec. 3.2) -> multi-modal distillation
(Sec. 3.3) -> per final task a decoder head (``model.head``) on the distilled features ``F^o_k``:

* ``a``: naive concatenation: ``F^o_k = conv3x3-BN-ReLU([F_1 ; ... ; F_T])``;
* ``b``: message passing: ``F^o_k = F_k + sum_{l != k} W_{l,k} * F_l``;
* ``c``: attention-guided message passing: ``G_k = sigmoid(W_g^k * F_k)``,
  ``F^o_k = F_k + sum_{l != k} G_k ⊙ (W_{l,k} * F_l)`` (the attention comes from the receiving
  task's own features, as in the paper).

The full PAD-Net is ``c``, the best module of the paper's ablation (Table 1), hence the default.
``W`` are 3x3 convolutions without bias (as in Vandenhende et al.'s implementation).

The paper predicts auxiliary tasks that are only supervised at the intermediate stage (normals
and contours feeding depth and segmentation): mark them in the config's ``aux_tasks`` (the one
mechanism for auxiliary tasks: they are then also left out of model selection and Δm); the
others get a final prediction. ``final_tasks`` overrides that choice (default: the tasks that
are not auxiliary). Every task has an intermediate prediction; a final task's loss is
``L(final) + aux_weight * L(intermediate)`` (through :meth:`deep_supervision`), an auxiliary
task's output *is* its intermediate prediction. Image-level tasks work too: their intermediate
and final heads are global-pooling classifiers on spatial features.

Parameters: shared = the backbone; task ``t`` = its intermediate branch, the distillation into
``t`` and its head. The backbone output is the single shared representation (``encode``); the
distillation modules carry gradients between tasks after it.
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
from ..heads import ClassifierHead, TaskHead

KINDS = ("a", "b", "c")


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(True))


def predictor(channels: int, task: Any) -> TaskHead:
    """An intermediate prediction layer: 1x1 conv (dense) or pooling + linear (image-level)."""
    if task.dense:
        return TaskHead(nn.Conv2d(channels, task.channels, 1), dense=True)
    return TaskHead(ClassifierHead(channels, task.channels), dense=False)


def check_final_tasks(final_tasks: Sequence[str] | None, tasks: Mapping[str, Any]) -> list[str]:
    """The tasks that get a final prediction: ``final_tasks``, else those not auxiliary."""
    if final_tasks is None:
        return [t for t, task in tasks.items() if not getattr(task, "auxiliary", False)]
    if isinstance(final_tasks, str) or not final_tasks or any(t not in tasks for t in final_tasks):
        raise ConfigError(
            f"model.options.final_tasks: got {final_tasks!r}, expected a non-empty list of "
            f"tasks among {', '.join(tasks)}"
        )
    return [t for t in tasks if t in final_tasks]


def check_weight(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"model.options.{key}: got {value!r}, expected a number >= 0")
    return float(value)


class Distillation(nn.Module):
    """PAD-Net's multi-modal distillation into task ``k`` from the features of all tasks."""

    def __init__(self, kind: str, channels: int, num_tasks: int, k: int) -> None:
        super().__init__()
        self.kind, self.k = kind, k
        C = channels
        if kind == "a":
            self.fuse = conv_bn_relu(num_tasks * C, C)
        else:
            self.message = nn.ModuleList(
                nn.Conv2d(C, C, 3, padding=1, bias=False) if l != k else nn.Identity()
                for l in range(num_tasks)
            )
            if kind == "c":
                self.gate = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.Sigmoid())

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "a":
            return self.fuse(torch.cat(feats, 1))
        own = feats[self.k]
        gate = self.gate(own) if self.kind == "c" else None
        out = own
        for l, f in enumerate(feats):
            if l != self.k:
                msg = self.message[l](f)
                out = out + (msg if gate is None else gate * msg)
        return out


@ARCHS.register("padnet")
class PADNet(MultiTaskModel):
    """Intermediate predictions -> multi-modal distillation -> final predictions (Xu et al.)."""

    has_representation = True

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        distillation: str = "c",
        channels: int | None = None,
        final_tasks: Sequence[str] | None = None,
        aux_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if distillation not in KINDS:
            raise ConfigError(
                f"model.options.distillation: got {distillation!r}, expected one of a, b, c"
            )
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ConfigError(
                f"model.options.channels: got {channels!r}, expected a positive integer"
            )
        self.tasks = list(tasks)
        self.final_tasks = check_final_tasks(final_tasks, tasks)
        self.aux_weight = check_weight(aux_weight, "aux_weight")
        self.backbone = build_backbone(backbone)
        cin = self.backbone.out_channels
        C = channels or min(cin, 256)
        self.branches = nn.ModuleDict(
            {t: nn.Sequential(conv_bn_relu(cin, C), conv_bn_relu(C, C)) for t in self.tasks}
        )
        self.intermediate = nn.ModuleDict({t: predictor(C, tasks[t]) for t in self.tasks})
        self.distill = nn.ModuleDict(
            {t: Distillation(distillation, C, len(self.tasks), self.tasks.index(t))
             for t in self.final_tasks}
        )
        self.heads = nn.ModuleDict({t: build_head(head, C, tasks[t]) for t in self.final_tasks})
        self._deep: dict[str, list[tuple[float, torch.Tensor]]] = {}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.branches[task].parameters()
        yield from self.intermediate[task].parameters()
        if task in self.distill:
            yield from self.distill[task].parameters()
            yield from self.heads[task].parameters()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)

    def decode(self, rep: torch.Tensor, size: Sequence[int]) -> dict[str, torch.Tensor]:
        feats = [self.branches[t](rep) for t in self.tasks]
        inter = {t: self.intermediate[t](f, size) for t, f in zip(self.tasks, feats)}
        out = {t: self.heads[t](self.distill[t](feats), size) for t in self.final_tasks}
        self._deep = {t: [(self.aux_weight, inter[t])] for t in self.final_tasks}
        return {t: out.get(t, inter[t]) for t in self.tasks}

    def deep_supervision(self) -> dict[str, list[tuple[float, torch.Tensor]]]:
        return self._deep
