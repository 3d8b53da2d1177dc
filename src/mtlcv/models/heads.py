"""Per-task decoders.

A head factory is registered in :data:`mtlcv.registry.HEADS` as
``factory(in_channels, out_channels, **options)`` and returns a module mapping features
``[B, Cin, h, w]`` to ``[B, Cout, h, w]`` at the same resolution. Architectures wrap it in a
:class:`TaskHead`, which upsamples dense predictions bilinearly to the image size.

Image-level tasks (``task.dense == False``, e.g. classification) always get
:class:`ClassifierHead` (global average pooling + one linear layer, the ResNet classifier of He
et al. 2016), whatever head the config names: a dense decoder has nothing to decode there. The
configured head's name and options are still validated, so a typo is reported either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import HEADS


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (k - 1) // 2
    return [
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


@HEADS.register("light")
def light(in_channels: int, out_channels: int, mid_channels: int | None = None) -> nn.Sequential:
    """conv3x3-BN-ReLU-conv1x1; ``mid_channels`` defaults to min(in_channels, 256)."""
    if mid_channels is not None and not _positive_int(mid_channels):
        raise ConfigError(
            f"model.head 'light': mid_channels must be a positive integer, got {mid_channels!r}"
        )
    mid = min(in_channels, 256) if mid_channels is None else mid_channels
    return nn.Sequential(*_conv_bn_relu(in_channels, mid, 3), nn.Conv2d(mid, out_channels, 1))


@HEADS.register("mtan")
def mtan(in_channels: int, out_channels: int) -> nn.Sequential:
    """mtan's prediction layer: conv3x3 (C -> C) then conv1x1 (C -> out), both with bias, no
    BN or ReLU between them (lorenmt/mtan ``im2im_pred/model_segnet_*.py``, ``conv_layer(...,
    pred=True)``; the same in CAGrad's, Nash-MTL's and FAMO's copies), Xavier-normal weights and
    zero biases as there. The SegNet-MTAN protocol's head: with it, SegNet-MTAN has exactly the
    official parameter count."""
    net = nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1),
        nn.Conv2d(in_channels, out_channels, 1),
    )
    for m in net:
        nn.init.xavier_normal_(m.weight)
        nn.init.zeros_(m.bias)
    return net


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLab-v3, Chen et al. 2017, Sec. 3.3).

    Parallel branches on the same features: a 1x1 convolution, one 3x3 atrous convolution per
    rate, and image pooling (global average -> 1x1 conv -> upsampled back); their concatenation
    is projected by a 1x1 convolution (then dropout, as in the reference implementation).
    """

    def __init__(
        self, in_channels: int, channels: int, rates: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(*_conv_bn_relu(in_channels, channels, 1))]
            + [nn.Sequential(*_conv_bn_relu(in_channels, channels, 3, r)) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, channels, 1))
        self.project = nn.Sequential(
            *_conv_bn_relu(channels * (len(rates) + 2), channels, 1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])  # upsampling a 1x1 map = repeating it
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


@HEADS.register("aspp")
def aspp(
    in_channels: int,
    out_channels: int,
    rates: Sequence[int] = (12, 24, 36),
    channels: int = 256,
    dropout: float = 0.5,
) -> nn.Sequential:
    """DeepLab-v3 head (Chen et al. 2017): ASPP, conv3x3-BN-ReLU, conv1x1 classifier.

    ``rates=(12, 24, 36)`` is the paper's choice for output stride 8 (and LibMTL's); use
    (6, 12, 18) at output stride 16.
    """
    if not _positive_int(channels):
        raise ConfigError(
            f"model.head 'aspp': channels must be a positive integer, got {channels!r}"
        )
    if (isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or not rates
            or not all(_positive_int(r) for r in rates)):
        raise ConfigError(f"model.head 'aspp': rates must be a list of positive integers, got "
                          f"{rates!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"model.head 'aspp': dropout must be a number in [0, 1), got {dropout!r}")
    return nn.Sequential(
        ASPP(in_channels, channels, tuple(rates), dropout),
        *_conv_bn_relu(channels, channels, 3),
        nn.Conv2d(channels, out_channels, 1),
    )


class ClassifierHead(nn.Module):
    """Image-level head: global average pooling + linear layer, ``[B,Cin,h,w] -> [B,Cout]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(-2, -1)))


class TaskHead(nn.Module):
    """One task's decoder: dense outputs are upsampled bilinearly to the image size."""

    def __init__(self, net: nn.Module, dense: bool) -> None:
        super().__init__()
        self.net = net
        self.dense = dense

    def forward(self, feat: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        out = self.net(feat)
        if self.dense and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out
