"""Multi-Task Attention Network (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, Sec. 3 and Fig. 2).

A shared backbone computes every stage once; each task owns one soft-attention module per stage
that selects from the shared features (eq. 1-2)::

    a_j^t = h_j^t( g_j^t( [u_j ; f_j(a_{j-1}^t)] ) ) ⊙ p_j

``u_j`` is an intermediate tensor of shared stage ``j`` and ``p_j`` its output; ``g`` is a 1x1
conv-BN-ReLU and ``h`` a 1x1 conv-BN-sigmoid (the mask); ``f_j`` is a 3x3 conv-BN-ReLU that
carries task ``t``'s attended features of the previous stage to stage ``j``'s channels and
resolution. As in the authors' code (lorenmt/mtan), ``f`` is shared by the tasks; in encoder
stages it follows the mask (conv, then max pooling when the stride grows), in decoder stages it
precedes it (bilinear upsampling, then conv), and at the encoder-decoder junction of SegNet both
happen (conv + pool to the bottleneck, upsample + conv), exactly as ``model_segnet_mtan.py``.
Each task's head reads its attended features of the last stage. Attention sits at every stage,
ResNet's stem included (the authors' ResNet-MTAN leaves the stem without one); ``reduction``
sets the mask's bottleneck (``C // reduction``: 1 in SegNet-MTAN, 4 in their ResNet-MTAN).

``u_j``: a backbone with ``forward_stage_parts`` (SegNet) gives it; for a stage that is an
``nn.Sequential`` of several blocks (tiny, ResNet layers) it is the output of all but the last
block, as in the authors' ResNet-MTAN (mask from ``layer[:-1]``, applied to ``layer[-1]``'s
output); otherwise (e.g. ResNet's stem) ``u_j = p_j``.

With every mask fixed to 1 (``set_fixed_masks(True)``, a test hook) ``a_L^t = p_L`` and the
model computes exactly hard parameter sharing with the same backbone and heads.

Parameters: shared = the backbone and the ``f`` blocks; task ``t`` = its head, and its masks
with ``attention_params: task`` (default). The official codes disagree on the masks, and a
gradient balancer sees the difference (which gradients enter the Gramian, what a shared-gradient
clip bounds, how the masks are scaled): CAGrad's NYUv2 code (Cranial-XIX/CAGrad
``nyuv2/model_segnet_mt.py``, ``shared_modules``) leaves ``encoder_att``/``decoder_att`` out of
the shared modules, so each mask gets its own task's plain gradient (``task``); Nash-MTL's and
FAMO's (``experiments/nyuv2/models.py``, ``SegNetMtan.shared_parameters``: every parameter
whose name lacks ``pred``) and Aligned-MTL's (SamsungLabs/MTL, ``MTANEncoder``) count them as
shared (``shared``): they are then in ``G``, in the clip of Nash-MTL, and get the aggregated
update. ``configs/nyuv2/published`` sets each paper's choice.
There is no single shared representation (the shared ``f`` blocks act on task features), so
``has_representation`` is False and gradient balancers work in parameter space.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import ARCHS
from ..base import Backbone, MultiTaskModel
from ..build import build_backbone, build_head


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """``f``: 3x3 conv (with bias, as mtan's ``conv_layer``), BN, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True))


class AttentionMask(nn.Module):
    """``h(g(x))``: 1x1 conv-BN-ReLU then 1x1 conv-BN-sigmoid, a mask in (0, 1) per element."""

    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(True),
            nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid(),
        )
        self.cout = cout
        self.fixed = False  # test hook: a mask of ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed:
            return x.new_ones(x.shape[0], self.cout, *x.shape[-2:])
        return self.net(x)


class Carry(nn.Module):
    """``f``: carries attended features of stage ``j-1`` to stage ``j``'s channels and size."""

    def __init__(self, enc: nn.Module | None, pool: int, dec: nn.Module | None) -> None:
        super().__init__()
        self.enc, self.pool, self.dec = enc, pool, dec

    def forward(self, a: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if self.enc is not None:
            a = self.enc(a)
            if self.pool > 1:
                a = F.max_pool2d(a, self.pool, self.pool)
        if a.shape[-2:] != size:  # decoder stages (and odd sizes): mtan's bilinear upsampling
            a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=True)
        return a if self.dec is None else self.dec(a)


def stage_parts(bb: Backbone, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_i, p_i)`` of backbone stage ``i`` (see the module docstring)."""
    if hasattr(bb, "forward_stage_parts"):
        return bb.forward_stage_parts(x, i)
    stage = bb.stages[i]
    # only split stages that forward_stage runs as they are, so the output stays identical
    if (
        type(bb).forward_stage is Backbone.forward_stage
        and isinstance(stage, nn.Sequential)
        and len(stage) > 1
    ):
        inner = stage[:-1](x)
        out = stage[-1](inner)
        if inner.shape[-2:] == out.shape[-2:]:
            return inner, out
        return out, out
    out = bb.forward_stage(x, i)
    return out, out


@ARCHS.register("mtan")
class MTAN(MultiTaskModel):
    """Shared backbone + per-task soft attention at every stage (Liu et al., CVPR 2019)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        reduction: int = 1,
        attention_params: str = "task",
    ) -> None:
        super().__init__()
        if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
            raise ConfigError(
                f"model.options.reduction: got {reduction!r}, expected a positive integer "
                "(mask bottleneck = channels // reduction; 1 in the SegNet-MTAN, 4 in ResNet-MTAN)"
            )
        if attention_params not in ("task", "shared"):
            raise ConfigError(
                f"model.options.attention_params: got {attention_params!r}, expected task "
                "(CAGrad's code) or shared (Nash-MTL's and FAMO's code)"
            )
        self.attention_params = attention_params
        self.tasks = list(tasks)
        bb = build_backbone(backbone)
        n, C, S = bb.num_stages, bb.stage_channels, bb.stage_strides
        dec = getattr(bb, "decoder_start", n)
        inner = self._inner_channels(bb)
        # registered before the backbone so that the backbone's last layer is the last shared
        # weight in parameter order (what GradNorm takes by default)
        carry = []
        for j in range(1, n):
            enc_f = dec_f = None
            pool = 1
            if j - 1 < dec:  # the previous stage is an encoder stage: conv, then pool
                enc_f = conv_block(C[j - 1], C[j] if j < dec else C[j - 1])
                # at the junction the shared path pools to the bottleneck (SegNet: stride 32)
                pool = S[j] // S[j - 1] if j < dec else 2
            if j >= dec:  # decoder stage: upsample, then conv
                dec_f = conv_block(C[j - 1], C[j])
            carry.append(Carry(enc_f, pool, dec_f))
        self.carry = nn.ModuleList(carry)
        self.backbone = bb
        self.attention = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    AttentionMask(inner[j] + (C[j] if j else 0), max(C[j] // reduction, 1), C[j])
                    for j in range(n)
                )
                for t in self.tasks
            }
        )
        self.heads = nn.ModuleDict(
            {t: build_head(head, C[-1], task) for t, task in tasks.items()}
        )
        for m in [*self.carry.modules(), *self.attention.modules()]:
            if isinstance(m, nn.Conv2d):  # mtan's initialisation of its own layers
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _inner_channels(bb: Backbone) -> list[int]:
        """Channels of every ``u_j``, from one small dry run in eval mode."""
        # a backbone of valid convolutions (LeNet) declares the smallest input it accepts
        size = max(4 * max(bb.stage_strides), getattr(bb, "min_size", 0))
        dev = next(bb.parameters()).device
        x = torch.zeros(1, 3, size, size, device=dev)
        mode = bb.training
        bb.eval()
        chans = []
        with torch.no_grad():
            for i in range(bb.num_stages):
                u, x = stage_parts(bb, x, i)
                chans.append(u.shape[1])
        bb.train(mode)
        return chans

    def set_fixed_masks(self, fixed: bool = True) -> None:
        """Test hook: fix every attention mask to 1 (MTAN then equals hard sharing)."""
        for m in self.modules():
            if isinstance(m, AttentionMask):
                m.fixed = fixed

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        if self.attention_params == "shared":
            yield from self.attention.parameters()
        yield from self.carry.parameters()
        yield from self.backbone.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if self.attention_params == "task":
            yield from self.attention[task].parameters()
        yield from self.heads[task].parameters()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = []
        x = image
        for j in range(self.backbone.num_stages):
            u, x = stage_parts(self.backbone, x, j)
            feats.append((u, x))
        out = {}
        for t in self.tasks:
            att = self.attention[t]
            a = None
            for j, (u, p) in enumerate(feats):
                x = u if a is None else torch.cat([u, self.carry[j - 1](a, u.shape[-2:])], 1)
                a = att[j](x) * p
            out[t] = self.heads[t](a, image.shape[-2:])
        return out
