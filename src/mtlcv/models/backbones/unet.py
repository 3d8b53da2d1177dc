"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015, Sec. 2 and Fig. 1), the seed's dense single-task model.

Contracting path: blocks of two 3x3 convolutions + ReLU, each block after the first preceded
by 2x2 max pooling; the channels double per block (64, 128, 256, 512, 1024 for ``width`` 64
and ``depth`` 4). Expanding path: per block a 2x2 up-convolution halving the channels, the
concatenation with the contracting block of the same resolution, and two 3x3 convolutions +
ReLU. The paper's last layer, a 1x1 convolution to the classes, is the task head here, so that
backbone and head make the paper's 23 convolutional layers. Weights are drawn from a Gaussian
of standard deviation sqrt(2/N), N the fan-in (Sec. 3, He et al. 2015).

``padding``: the paper's convolutions are unpadded ("valid"), so the output is smaller than
the input (572x572 -> 388x388) and every skip connection is cropped to the centre; with
``padding: true`` (the default here, as in most reimplementations for dense multi-task
prediction) the convolutions keep the size and every stage is at exactly ``H / stride``.
``batch_norm`` (off in the paper, which predates its use in such networks) adds BN after every
3x3 convolution. ``dropout``: "drop-out layers at the end of the contracting path" (Sec. 3);
the paper gives no rate, so the default is 0 (off); it acts on the outputs of the last two
contracting blocks.

Stages (``2 * depth + 1``): contracting blocks 0..depth at strides 1, 2, ..., 2^depth, then
expanding blocks at strides 2^(depth-1), ..., 1 (``decoder_start`` = depth + 1, as SegNet's).
The skip features are kept on the module between stage calls (each contracting stage stores the
input it receives, which is the previous stage's output, or that output after an
architecture's mixing, e.g. cross-stitch), so the stages of one forward must run in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import BACKBONES
from ..base import Backbone, ImageNormalize


def double_conv(cin: int, cout: int, padding: bool, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=int(padding), bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def center_crop(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The centre ``size`` window of ``x`` (the paper's cropping of the skip features)."""
    dh, dw = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., dh : dh + size[0], dw : dw + size[1]]


class Up(nn.Module):
    """2x2 up-convolution, concatenation with the skip features, two 3x3 convolutions."""

    def __init__(self, cin: int, cout: int, padding: bool, batch_norm: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = double_conv(2 * cout, cout, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:
            if skip.shape[-2] >= x.shape[-2] and skip.shape[-1] >= x.shape[-1] and \
                    self.conv[0].padding == (0, 0):
                skip = center_crop(skip, x.shape[-2:])  # the paper: crop the skip
            else:  # padded, odd sizes: grow the upsampled map to the skip's size
                dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
                x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.conv(torch.cat([skip, x], 1))


class UNet(Backbone):
    """U-Net encoder-decoder with ``2 * depth + 1`` stages; see the module docstring."""

    def __init__(self, width: int = 64, depth: int = 4, padding: bool = True,
                 batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        f = [width * 2**i for i in range(depth + 1)]
        self.depth, self.decoder_start = depth, depth + 1
        self.normalize = ImageNormalize()
        enc = [double_conv(3 if i == 0 else f[i - 1], f[i], padding, batch_norm)
               for i in range(depth + 1)]
        dec = [Up(f[i + 1], f[i], padding, batch_norm) for i in reversed(range(depth))]
        self.stages = nn.ModuleList(enc + dec)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.stage_channels = f + f[-2::-1]
        self.stage_strides = [2**i for i in range(depth + 1)] + [2**i for i in
                                                                 reversed(range(depth))]
        self._skips: dict[int, torch.Tensor] = {}
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_stage(self, x: torch.Tensor, i: int) -> torch.Tensor:
        d = self.depth
        if i == 0:
            return self.stages[0](self.normalize(x))
        if i <= d:
            self._skips[i - 1] = x
            out = self.stages[i](F.max_pool2d(x, 2))
            return self.dropout(out) if i >= d - 1 else out
        return self.stages[i](x, self._skips[2 * d - i])


@BACKBONES.register("unet")
def unet(width: int = 64, depth: int = 4, padding: bool = True, batch_norm: bool = False,
         dropout: float = 0.0) -> UNet:
    """U-Net (Ronneberger et al. 2015) encoder-decoder; output stride 1, ``width`` channels."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.backbone 'unet': width must be a positive integer, got {width!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 6:
        raise ConfigError(f"model.backbone 'unet': depth must be an integer from 1 to 6, got "
                          f"{depth!r}")
    for key, value in (("padding", padding), ("batch_norm", batch_norm)):
        if not isinstance(value, bool):
            raise ConfigError(f"model.backbone 'unet': {key} must be true or false, got {value!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"model.backbone 'unet': dropout must be in [0, 1), got {dropout!r}")
    return UNet(width, depth, padding, batch_norm, float(dropout))
