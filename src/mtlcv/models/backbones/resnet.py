"""ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Parameter and buffer names are identical to torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...; the classifier ``fc`` is not part of the
backbone), so torchvision's ImageNet checkpoints load through the ``weights`` option. The
bottleneck puts its stride on the 3x3 convolution (ResNet v1.5), as torchvision does.

``dilated=True`` replaces the strides of ``layer3`` and ``layer4`` with dilation (Yu & Koltun
2016; DeepLab-v3, Chen et al. 2017), torchvision's ``replace_stride_with_dilation=[False, True,
True]``: output stride 8 instead of 32, same parameters. The 3x3 convolution that carried the
stride keeps the previous dilation, the others take the new one (torchvision's rule for
Bottleneck, applied here to BasicBlock too, which torchvision does not dilate).

Stages: 0 = ImageNormalize, conv1, bn1, relu, maxpool (stride 4); 1..4 = layer1..layer4.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...registry import BACKBONES
from ..base import Backbone, ImageNormalize
from ..weights import load_weights


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut (He et al. Fig. 2)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        prev_dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, prev_dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with shortcut (He et al. Fig. 5, stride on the 3x3)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        prev_dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, prev_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(Backbone):
    """A torchvision-compatible ResNet trunk without its classifier, exposing 5 stages."""

    def __init__(self, block: Block, layers: list[int], dilated: bool = False) -> None:
        super().__init__()
        # State dict keys must stay torchvision's, so no ModuleList owns the stages: the base
        # class's one is dropped and ``stages`` lists the attributes below (see the property).
        del self.stages
        self.normalize = ImageNormalize()  # no state: its buffers are not persistent
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._inplanes, self._dilation = 64, 1
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate=dilated)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate=dilated)
        del self._inplanes, self._dilation
        e = block.expansion
        self.stage_channels = [64, 64 * e, 128 * e, 256 * e, 512 * e]
        self.stage_strides = [4, 4, 8, 8, 8] if dilated else [4, 4, 8, 16, 32]
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list:  # type: ignore[override]
        # built on access, so copies and replicas of the module use their own submodules
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        prev_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self._inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self._inplanes, planes, stride, downsample, self._dilation, prev_dilation)]
        self._inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self._inplanes, planes, dilation=self._dilation, prev_dilation=self._dilation)
            )
        return nn.Sequential(*layers)


def _resnet(
    name: str, block: Block, layers: list[int], dilated: bool, weights: str | None
) -> ResNet:
    model = ResNet(block, layers, dilated=dilated)
    if weights is not None:
        load_weights(model, weights, ignore=("fc.",), where=f"model.backbone {name!r} weights")
    return model


@BACKBONES.register("resnet18")
def resnet18(dilated: bool = False, weights: str | None = None) -> ResNet:
    """ResNet-18 (He et al. 2016); torchvision names; ``dilated``: output stride 8."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], dilated, weights)


@BACKBONES.register("resnet34")
def resnet34(dilated: bool = False, weights: str | None = None) -> ResNet:
    """ResNet-34 (He et al. 2016); torchvision names; ``dilated``: output stride 8."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], dilated, weights)


@BACKBONES.register("resnet50")
def resnet50(dilated: bool = False, weights: str | None = None) -> ResNet:
    """ResNet-50 (He et al. 2016, v1.5); torchvision names; ``dilated``: output stride 8."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], dilated, weights)
