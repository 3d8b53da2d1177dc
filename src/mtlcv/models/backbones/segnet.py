"""SegNet (Badrinarayanan et al., "SegNet: A Deep Convolutional Encoder-Decoder Architecture for
Image Segmentation", TPAMI 2017), as used by MTAN (Liu et al., "End-to-End Multi-Task Learning
with Attention", CVPR 2019) and the NYUv2 protocol of Nash-MTL, CAGrad and FAMO.

The layer layout is that of lorenmt/mtan's ``model_segnet_*.py``: a VGG-16 encoder of 13
3x3 conv-BN-ReLU layers in five blocks (2, 2, 3, 3, 3 layers; channels 64, 128, 256, 512, 512)
and its mirror image as decoder; every block is followed by 2x2 max pooling in the encoder and
preceded by max *unpooling* with the pooling indices of the matching encoder block in the
decoder. Convolutions keep their bias and use Xavier-normal initialisation, as in that code, so
that parameter counts match the paper's (one 13-class SegNet: 24,981,069 parameters, of which
the trunk here holds all but the 3x3 + 1x1 prediction layers: the ``mtan`` head).

Input: like mtan's SegNet (which is trained from scratch and reads mtan's NYUv2 release, images
in [0, 1]), the image enters as is (``standardize=False``); ``standardize=True`` subtracts the
ImageNet mean and divides by its std first, as the other backbones do for their pretrained
weights (SegNet has none here).

Stages (10): encoder blocks 0-4 at strides 1, 2, 4, 8, 16 (each of stages 1-4 first max-pools
its input) and decoder blocks 5-9 at strides 16, 8, 4, 2, 1 (stage 5 first pools the last
encoder block to stride 32 and unpools it back, as SegNet does). Stage outputs are the features
*before* pooling, which is where MTAN's attention modules read them. ``forward_stage_parts``
also returns the intermediate tensor MTAN computes its masks from: the first layer's output in
an encoder block, the unpooled input in a decoder block (``decoder_start`` = 5 tells MTAN where
the decoder begins). Pooling indices are kept on the module between stage calls, so the stages
of one forward must run in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import BACKBONES
from ..base import Backbone, ImageNormalize


def conv_layer(cin: int, cout: int) -> nn.Sequential:
    """mtan's ``conv_layer``: 3x3 convolution (with bias), BN, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True))


class SegNet(Backbone):
    """VGG-16 SegNet encoder-decoder with 10 stages; ``width`` = first-block channels (64)."""

    decoder_start = 5

    def __init__(self, width: int = 64, standardize: bool = False) -> None:
        super().__init__()
        f = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        layers = [2, 2, 3, 3, 3]
        self.normalize = ImageNormalize() if standardize else nn.Identity()
        enc = []
        for i in range(5):
            cin = 3 if i == 0 else f[i - 1]
            enc.append(nn.Sequential(conv_layer(cin, f[i]),
                                     *[conv_layer(f[i], f[i]) for _ in range(layers[i] - 1)]))
        dec = []
        for i in reversed(range(5)):  # mirror: block i maps f[i] -> f[i-1] (f[0] for i = 0)
            cout = f[max(i - 1, 0)]
            dec.append(nn.Sequential(conv_layer(f[i], cout),
                                     *[conv_layer(cout, cout) for _ in range(layers[i] - 1)]))
        self.stages = nn.ModuleList(enc + dec)
        self.stage_channels = f + [f[3], f[2], f[1], f[0], f[0]]
        self.stage_strides = [1, 2, 4, 8, 16, 16, 8, 4, 2, 1]
        self._pool: dict[int, tuple[torch.Tensor, torch.Size]] = {}
        for m in self.modules():  # mtan's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def _down(self, x: torch.Tensor, level: int) -> torch.Tensor:
        out, idx = F.max_pool2d(x, 2, 2, return_indices=True)
        self._pool[level] = (idx, x.shape[-2:])
        return out

    def forward_stage_parts(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inner, out)`` of stage ``i``: the tensor MTAN's mask reads, and the stage output."""
        block = self.stages[i]
        if i < self.decoder_start:
            x = self.normalize(x) if i == 0 else self._down(x, i - 1)
            inner = block[0](x)
            return inner, block[1:](inner)
        level = 9 - i  # the encoder block this decoder block mirrors
        if level == 4:
            x = self._down(x, 4)
        idx, size = self._pool[level]
        inner = F.max_unpool2d(x, idx, 2, 2, output_size=size)
        return inner, block(inner)

    def forward_stage(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.forward_stage_parts(x, i)[1]


@BACKBONES.register("segnet")
def segnet(width: int = 64, standardize: bool = False) -> SegNet:
    """SegNet encoder-decoder (VGG-16, as in MTAN's NYUv2 code); 10 stages, output stride 1.

    ``standardize``: ImageNet standardisation of the input (off: mtan feeds [0, 1] images)."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ConfigError(
            f"model.backbone 'segnet': width must be a positive integer, got {width!r}"
        )
    if not isinstance(standardize, bool):
        raise ConfigError(
            f"model.backbone 'segnet': standardize must be true or false, got {standardize!r}"
        )
    return SegNet(width, standardize)
