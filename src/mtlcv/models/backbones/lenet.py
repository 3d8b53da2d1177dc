"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 86(11), 1998, Sec. II-B and Fig. 2), the seed's small-image classifier.

Layers as in the paper, for a 32x32 input: C1 six 5x5 convolutions (28x28); S2 2x2
subsampling (14x14); C3 sixteen 5x5 convolutions on *subsets* of S2's maps, Table I (10x10);
S4 2x2 subsampling (5x5); C5 120 5x5 convolutions (1x1); F6 84 units. Every layer is followed
by the paper's squashing function ``f(a) = A tanh(S a)``, A = 1.7159, S = 2/3 (Appendix A).
A subsampling unit adds its four inputs, multiplies the sum by a trainable coefficient and adds
a trainable bias, one pair per map (Sec. II-B). Weights are drawn uniformly from
``[-2.4/F, 2.4/F]``, F the unit's fan-in (Appendix C). With ``grayscale: true`` the network has
exactly the paper's **60,000** trainable parameters (C1 156, S2 12, C3 1,516, S4 32,
C5 48,120, F6 10,164).

Departures: (1) images enter in colour (C1 then has 456 parameters) unless ``grayscale`` is set,
which converts them to luminance (ITU-R BT.601) first; (2) inputs are standardised with the
ImageNet statistics like every built-in backbone, not mapped to [-0.1, 1.175]; (3) the paper's
output layer of Euclidean RBF units with fixed codes is replaced by the task's head (a linear
classifier on F6, i.e. a softmax output trained with cross-entropy, the modern equivalent).

Stages: 0 = C1 + S2 (stride 2), 1 = C3 + S4 (stride 4), 2 = C5, 3 = F6 as a 1x1 convolution
(both stride 4 with valid 5x5 convolutions, so a 32x32 image gives 1x1 maps; larger images
give larger maps, which the classifier head pools). Images must be at least 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError, DataError
from ...registry import BACKBONES
from ..base import Backbone, ImageNormalize

A, S = 1.7159, 2.0 / 3.0
#: Table I: the S2 maps each C3 map combines (columns 0-5: three contiguous maps, 6-11: four
#: contiguous, 12-14: four non-contiguous, 15: all six)
C3_TABLE = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)
MIN_SIZE = 32


class Squash(nn.Module):
    """``A tanh(S a)`` with A = 1.7159, S = 2/3 (LeCun et al. 1998, Appendix A)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return A * torch.tanh(S * x)


class Subsampling(nn.Module):
    """S2/S4: sum of each 2x2 block times a trainable coefficient plus a bias, per map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        bound = 2.4 / 4  # fan-in 4
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = nn.functional.avg_pool2d(x, 2) * 4
        return summed * self.weight[:, None, None] + self.bias[:, None, None]


class PartialConv(nn.Module):
    """C3: each output map convolves only the input maps its row of ``table`` names.

    Only the weights of existing connections are parameters (1,500 + 16 biases for Table I);
    they are scattered into a dense kernel with zeros elsewhere at every forward, so one dense
    convolution runs (grouped convolutions over gathered maps are much slower on CPU) and the
    absent connections have neither a weight nor a gradient.
    """

    def __init__(self, table: tuple[tuple[int, ...], ...], cin: int = 6, kernel: int = 5) -> None:
        super().__init__()
        k2 = kernel * kernel
        self.shape = (len(table), cin, kernel, kernel)
        idx = [(j * cin + i) * k2 + t for j, row in enumerate(table) for i in row
               for t in range(k2)]
        self.register_buffer("index", torch.tensor(idx), persistent=False)
        self.weight = nn.Parameter(torch.empty(len(idx)))
        self.bias = nn.Parameter(torch.empty(len(table)))
        # Appendix C: uniform in +-2.4 / fan-in, the fan-in of each map being its inputs x 25
        with torch.no_grad():
            start = 0
            for j, row in enumerate(table):
                bound = 2.4 / (len(row) * k2)
                self.weight[start : start + len(row) * k2].uniform_(-bound, bound)
                self.bias[j].uniform_(-bound, bound)
                start += len(row) * k2

    def dense_weight(self) -> torch.Tensor:
        flat = self.weight.new_zeros(self.shape[0] * self.shape[1] * self.shape[2] ** 2)
        return flat.index_copy(0, self.index, self.weight).view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.dense_weight(), self.bias)


class Grayscale(nn.Module):
    """Luminance Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601), as one channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        return (x * w[:, None, None]).sum(1, keepdim=True)


class LeNet5(Backbone):
    """LeNet-5 up to F6 (84 maps), four stages; see the module docstring."""

    #: the smallest input (H and W) the valid convolutions accept
    min_size = MIN_SIZE

    def __init__(self, grayscale: bool = False) -> None:
        super().__init__()
        cin = 1 if grayscale else 3
        # standardise colour first (as every backbone), then reduce to luminance if asked
        first = [ImageNormalize()] + ([Grayscale()] if grayscale else [])
        self.stages = nn.ModuleList([
            nn.Sequential(*first, nn.Conv2d(cin, 6, 5), Squash(), Subsampling(6), Squash()),
            nn.Sequential(PartialConv(C3_TABLE), Squash(), Subsampling(16), Squash()),
            nn.Sequential(nn.Conv2d(16, 120, 5), Squash()),
            nn.Sequential(nn.Conv2d(120, 84, 1), Squash()),
        ])
        self.stage_channels = [6, 16, 120, 84]
        self.stage_strides = [2, 4, 4, 4]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.uniform_(m.weight, -2.4 / fan_in, 2.4 / fan_in)
                nn.init.uniform_(m.bias, -2.4 / fan_in, 2.4 / fan_in)

    def forward_stage(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if i == 0 and min(x.shape[-2:]) < MIN_SIZE:
            raise DataError(f"model.backbone 'lenet': images must be at least {MIN_SIZE}x"
                            f"{MIN_SIZE} (the paper's input), got {x.shape[-2]}x{x.shape[-1]}")
        return self.stages[i](x)


@BACKBONES.register("lenet")
def lenet(grayscale: bool = False) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998) up to F6; images >= 32x32; ``grayscale``: the paper's input."""
    if not isinstance(grayscale, bool):
        raise ConfigError(f"model.backbone 'lenet': grayscale must be true or false, got "
                          f"{grayscale!r}")
    return LeNet5(grayscale)

