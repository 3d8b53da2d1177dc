"""A tiny plain CNN for CPU demos and tests.

Four stages of 3x3 conv-BN-ReLU blocks (the VGG recipe, Simonyan & Zisserman 2015, with batch
normalisation, Ioffe & Szegedy 2015). Output strides 2, 4, 8, 8: the last stage keeps the
resolution and dilates its convolutions instead (Yu & Koltun 2016), like the output-stride-8
dilated ResNets used for dense prediction, so heads and architectures behave the same on both.
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ...registry import BACKBONES
from ..base import Backbone, ImageNormalize


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyNet(Backbone):
    """Stage channels ``[w, 2w, 4w, 4w]`` at strides ``[2, 4, 8, 8]`` for ``width`` w."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stage_channels = [w, 2 * w, 4 * w, 4 * w]
        self.stage_strides = [2, 4, 8, 8]
        self.stages = nn.ModuleList(
            [
                nn.Sequential(ImageNormalize(), conv_bn_relu(3, w, stride=2)),
                nn.Sequential(conv_bn_relu(w, 2 * w, stride=2), conv_bn_relu(2 * w, 2 * w)),
                nn.Sequential(conv_bn_relu(2 * w, 4 * w, stride=2), conv_bn_relu(4 * w, 4 * w)),
                nn.Sequential(
                    conv_bn_relu(4 * w, 4 * w, dilation=2), conv_bn_relu(4 * w, 4 * w, dilation=2)
                ),
            ]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@BACKBONES.register("tiny")
def tiny(width: int = 32) -> TinyNet:
    """Tiny 4-stage CNN (output stride 8) for fast CPU runs; ``width`` = first-stage channels."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ConfigError(f"model.backbone 'tiny': width must be a positive integer, got {width!r}")
    return TinyNet(width)
