"""MTI-Net (Vandenhende, Georgoulis & Van Gool, "MTI-Net: Multi-Scale Task Interaction Networks
for Multi-Task Learning", ECCV 2020, Sec. 3 and Fig. 3).

On the last ``scales`` (4) stages of the backbone, from the coarsest scale to the finest:

1. initial task predictions per scale (Sec. 3.2): per task, two residual blocks on
   ``[backbone features of the scale ; the task's propagated features from the coarser scale]``
   give the task features, a 1x1 convolution the initial prediction (deep supervision at every
   scale);
2. feature propagation module (FPM, Sec. 3.3) from each scale to the next finer one: the
   concatenated task features go through a non-linear function (two residual blocks and a 1x1
   convolution); a softmax over the tasks of its output weighs every task's features per channel
   and pixel; a residual block reduces the weighted sum to one shared feature map, and each task
   adds its own squeeze-and-excitation (Hu et al. 2018) of it to its features;
3. multi-modal distillation per scale (Sec. 3.4, eq. 2): ``F^o_k = F_k + sum_{l != k}
   sigmoid(W_{k,l} * F_l) ⊙ (W'_{k,l} * F_l)``;
4. feature aggregation: per task, the distilled features of all scales are upsampled to the
   finest scale and concatenated; a head predicts from them: by default (``aggregation:
   hrnet``) the paper's HRNet head, a 1x1 conv-BN-ReLU keeping the channels and a 1x1
   convolution; ``aggregation: head`` uses ``model.head`` instead (a 3x3 head on the
   concatenation at the finest scale costs several times the rest of the model).

Layer sizes follow the authors' code (Multi-Task-Learning-PyTorch ``mti_net.py``). One departure:
that code takes the FPM's softmax over a ``view`` that groups *consecutive channels* of the
task-major concatenation; here it is taken over the tasks, as the paper describes. The backbone
needs at least ``scales`` stages; consecutive scales may share a stride (tiny's last two).
``final_tasks`` and ``aux_weight`` work as in :mod:`.padnet`; an auxiliary task's output is its
initial prediction at the finest scale, its coarser ones are deep supervision.

Parameters: shared = the backbone and the FPMs' non-linear and reduction blocks (they mix all
tasks); task ``t`` = its initial-prediction branches, its SE blocks, the distillation into ``t``
and its head. No single shared representation (the FPMs' shared blocks act on task features).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import ARCHS, HEADS
from ..backbones.resnet import BasicBlock
from ..base import MultiTaskModel
from ..build import build_backbone, build_head, resolve
from ..heads import ClassifierHead, TaskHead
from .padnet import check_final_tasks, check_weight, predictor


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def residual(cin: int, cout: int) -> BasicBlock:
    """A ResNet basic block, with a 1x1 projection shortcut when the channels change."""
    down = None
    if cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, downsample=down)


class SqueezeExcitation(nn.Module):
    """Channel gating (Hu et al., CVPR 2018), reduction 16 as in the authors' code."""

    def __init__(self, channels: int, r: int = 16) -> None:
        super().__init__()
        mid = max(channels // r, 1)
        self.fc = nn.Sequential(nn.Linear(channels, mid), nn.ReLU(True), nn.Linear(mid, channels),
                                nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(-2, -1)))[:, :, None, None]


class FeaturePropagation(nn.Module):
    """MTI-Net's FPM (Sec. 3.3) for ``T`` tasks of ``C`` channels each."""

    def __init__(self, num_tasks: int, channels: int) -> None:
        super().__init__()
        T, C = num_tasks, channels
        S = T * C
        mid = max(S // 4, 1)
        self.T, self.C = T, C
        self.nonlinear = nn.Sequential(residual(S, mid), residual(mid, mid), nn.Conv2d(mid, S, 1))
        self.reduce = residual(S, C)
        self.se = nn.ModuleList(SqueezeExcitation(C) for _ in range(T))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat(feats, 1)
        B, _, H, W = x.shape
        mask = torch.softmax(self.nonlinear(x).view(B, self.T, self.C, H, W), dim=1)
        shared = self.reduce((mask * x.view(B, self.T, self.C, H, W)).view(B, -1, H, W))
        return [se(shared) + f for se, f in zip(self.se, feats)]


class SpatialAttentionDistillation(nn.Module):
    """MTI-Net eq. 2 into task ``k``: attention computed from each *sending* task's features."""

    def __init__(self, channels: int, num_tasks: int, k: int) -> None:
        super().__init__()
        C = channels
        self.k = k
        self.gate = nn.ModuleList(
            nn.Conv2d(C, C, 3, padding=1, bias=False) if l != k else nn.Identity()
            for l in range(num_tasks)
        )
        self.message = nn.ModuleList(
            nn.Conv2d(C, C, 3, padding=1, bias=False) if l != k else nn.Identity()
            for l in range(num_tasks)
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = feats[self.k]
        for l, f in enumerate(feats):
            if l != self.k:
                out = out + torch.sigmoid(self.gate[l](f)) * self.message[l](f)
        return out


def hrnet_head(spec: Mapping[str, Any], channels: int, task: Any) -> TaskHead:
    """HRNet's segmentation head (Wang et al. 2020), MTI-Net's aggregation; ``spec`` is checked."""
    resolve(HEADS, spec, "model.head", ("in_channels", "out_channels"))  # still a valid head?
    if not task.dense:
        return TaskHead(ClassifierHead(channels, task.channels), dense=False)
    net = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(True),
                        nn.Conv2d(channels, task.channels, 1))
    return TaskHead(net, dense=True)


@ARCHS.register("mti_net")
class MTINet(MultiTaskModel):
    """Multi-scale task interaction: per-scale predictions, FPM, distillation (ECCV 2020)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        scales: int = 4,
        aggregation: str = "hrnet",
        final_tasks: Sequence[str] | None = None,
        aux_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if aggregation not in ("hrnet", "head"):
            raise ConfigError(
                f"model.options.aggregation: got {aggregation!r}, expected hrnet or head"
            )
        self.tasks = list(tasks)
        self.final_tasks = check_final_tasks(final_tasks, tasks)
        self.aux_weight = check_weight(aux_weight, "aux_weight")
        bb = build_backbone(backbone)
        n = bb.num_stages
        if isinstance(scales, bool) or not isinstance(scales, int) or not 2 <= scales <= n:
            raise ConfigError(
                f"model.options.scales: got {scales!r}; backbone {backbone.get('name')!r} has "
                f"{n} stages, expected an integer from 2 to {n}"
            )
        self.stage_ids = list(range(n - scales, n))
        Cs = [bb.stage_channels[i] for i in self.stage_ids]
        T = len(self.tasks)
        self.backbone = bb
        # scale s (0 = finest) reads the backbone and, below the coarsest, scale s+1's FPM output
        self.refine = nn.ModuleList(
            nn.ModuleDict(
                {t: nn.Sequential(residual(Cs[s] + (Cs[s + 1] if s + 1 < scales else 0), Cs[s]),
                                  residual(Cs[s], Cs[s])) for t in self.tasks}
            )
            for s in range(scales)
        )
        self.initial = nn.ModuleList(
            nn.ModuleDict({t: predictor(Cs[s], tasks[t]) for t in self.tasks})
            for s in range(scales)
        )
        self.fpm = nn.ModuleList(FeaturePropagation(T, Cs[s]) for s in range(1, scales))
        self.distill = nn.ModuleList(
            nn.ModuleDict(
                {t: SpatialAttentionDistillation(Cs[s], T, self.tasks.index(t))
                 for t in self.final_tasks}
            )
            for s in range(scales)
        )
        make = hrnet_head if aggregation == "hrnet" else build_head
        self.heads = nn.ModuleDict({t: make(head, sum(Cs), tasks[t]) for t in self.final_tasks})
        self._deep: dict[str, list[tuple[float, torch.Tensor]]] = {}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters()
        for fpm in self.fpm:
            yield from fpm.nonlinear.parameters()
            yield from fpm.reduce.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        i = self.tasks.index(task)
        for s in range(len(self.stage_ids)):
            yield from self.refine[s][task].parameters()
            yield from self.initial[s][task].parameters()
            if task in self.final_tasks:
                yield from self.distill[s][task].parameters()
        for fpm in self.fpm:
            yield from fpm.se[i].parameters()
        if task in self.heads:
            yield from self.heads[task].parameters()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        size = image.shape[-2:]
        feats = self.backbone.forward_stages(image)
        xs = [feats[i] for i in self.stage_ids]
        S = len(xs)
        task_feats: list[list[torch.Tensor]] = [[] for _ in range(S)]
        preds: dict[str, dict[int, torch.Tensor]] = {t: {} for t in self.tasks}
        propagated = None
        for s in reversed(range(S)):
            for i, t in enumerate(self.tasks):
                x = xs[s]
                if propagated is not None:
                    x = torch.cat([x, resize(propagated[i], x.shape[-2:])], 1)
                f = self.refine[s][t](x)
                task_feats[s].append(f)
                preds[t][s] = self.initial[s][t](f, size)
            if s > 0:
                propagated = self.fpm[s - 1](task_feats[s])
        fine = xs[0].shape[-2:]
        out = {}
        for t in self.final_tasks:
            multi = [resize(self.distill[s][t](task_feats[s]), fine) for s in range(S)]
            out[t] = self.heads[t](torch.cat(multi, 1), size)
        # a final task is supervised at every scale, an auxiliary one's finest scale is its output
        first = {t: 0 if t in out else 1 for t in self.tasks}
        self._deep = {
            t: [(self.aux_weight, preds[t][s]) for s in range(first[t], S)] for t in self.tasks
        }
        return {t: out.get(t, preds[t][0]) for t in self.tasks}

    def deep_supervision(self) -> dict[str, list[tuple[float, torch.Tensor]]]:
        return self._deep
