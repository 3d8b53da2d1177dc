"""NDDR-CNN (Gao, Ma, Zhao, Liu & Yuille, "NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs
by Neural Discriminative Dimensionality Reduction", CVPR 2019, sec. 3, eq. 1-2).

One backbone per task; after every stage an NDDR layer concatenates the T tasks' features along
the channels and, per task, reduces them back to C channels with a 1x1 convolution (no bias),
batch normalisation and ReLU: ``x_t <- ReLU(BN_t(W_t [x_1; ...; x_T]))``. ``W_t`` starts as
``alpha`` times the identity on task t's own channels and ``beta`` times the identity on every
other task's (the paper's "diagonal" initialisation), so training starts near the single-task
networks. ``alpha = 0.8``, ``beta = 0.05`` and the BN momentum 0.05 are the dense-prediction
survey's settings (Vandenhende et al., TPAMI 2021; ``configs/pascal/resnet18/nddr_cnn.yml`` and
``models/nddr_cnn.py`` of its code, whose layer this follows). ``init_from`` starts each task's
backbone and head from a trained single-task network, as the survey's code always does (see
:mod:`.cross_stitch`).

Not replicated: the survey's optimizer gives the NDDR layers 100 times the base learning rate
(after the NDDR-CNN paper); mtlcv's config has one learning rate for all parameters.

Parameters: the backbones and the NDDR layers below the last stage reach every task; task ``t``
owns the last stage's NDDR reduction into ``t`` and its head. No single shared representation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import ARCHS
from ..base import MultiTaskModel
from .cross_stitch import load_single_task
from .stl import SingleTaskNet


class NDDRLayer(nn.Module):
    """``x_t <- ReLU(BN(W_t [x_1; ...; x_T]))`` for every task t (Gao et al., eq. 1-2)."""

    def __init__(self, num_tasks: int, channels: int, alpha: float, beta: float) -> None:
        super().__init__()
        T, C = num_tasks, channels
        self.reduce = nn.ModuleList()
        for t in range(T):
            conv = nn.Conv2d(T * C, C, 1, bias=False)
            w = torch.zeros(C, T * C)
            for s in range(T):
                w[:, s * C:(s + 1) * C] = torch.eye(C) * (alpha if s == t else beta)
            with torch.no_grad():
                conv.weight.copy_(w.view(C, T * C, 1, 1))
            self.reduce.append(nn.Sequential(conv, nn.BatchNorm2d(C, momentum=0.05),
                                             nn.ReLU(inplace=True)))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat(xs, 1)
        return [r(x) for r in self.reduce]


@ARCHS.register("nddr_cnn")
class NDDRCNN(MultiTaskModel):
    """One backbone per task, fused by an NDDR layer after every stage (Gao et al., CVPR 2019)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        alpha: float = 0.8,
        beta: float = 0.05,
        init_from: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for key, v in (("alpha", alpha), ("beta", beta)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"model.options.{key}: got {v!r}, expected a number")
        self.tasks = list(tasks)
        nets = {t: SingleTaskNet(task, backbone, head) for t, task in tasks.items()}
        bb = nets[self.tasks[0]].backbone
        T = len(self.tasks)
        self.nddr = nn.ModuleList(NDDRLayer(T, c, float(alpha), float(beta))
                                  for c in bb.stage_channels)
        self.nets = nn.ModuleDict(nets)
        for t, source in (init_from or {}).items():
            where = f"model.options.init_from.{t}"
            if t not in nets:
                raise ConfigError(
                    f"{where}: {t!r} is not a task of this model ({', '.join(self.tasks)})")
            load_single_task(nets[t], t, source, where)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        for layer in list(self.nddr)[:-1]:
            yield from layer.parameters()
        for t in self.tasks:
            yield from self.nets[t].backbone.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.nddr[-1].reduce[self.tasks.index(task)].parameters()
        yield from self.nets[task].head.parameters()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        xs = [image] * len(self.tasks)
        for i, layer in enumerate(self.nddr):
            xs = layer([self.nets[t].backbone.forward_stage(x, i) for t, x in zip(self.tasks, xs)])
        return {t: self.nets[t].head(x, image.shape[-2:]) for t, x in zip(self.tasks, xs)}
