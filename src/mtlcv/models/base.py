"""The model and backbone contracts.

A :class:`MultiTaskModel` maps an image batch ``[B,3,H,W]`` to ``{task: prediction}`` and
declares which of its parameters are shared by all tasks and which belong to each task. Where
the architecture has a single shared representation (hard parameter sharing, MTAN's shared
trunk...), ``encode`` returns it and ``decode`` maps it to the predictions, so that balancers can
take per-task gradients with respect to the representation (the MGDA-UB shortcut) instead of
the shared parameters; ``forward(x) == decode(encode(x), x.shape[-2:])``.

A :class:`Backbone` exposes its stages: ``forward_stage(x, i)`` runs stage ``i`` alone and
``stage_channels[i]`` / ``stage_strides[i]`` describe its output, so that cross-stitch, MTAN and
other stage-wise architectures can wrap any backbone. ``stages`` is usually an
``nn.ModuleList``; a backbone whose parameter names must match a published checkpoint (ResNet
keeps torchvision's ``conv1``, ``layer1``...) may instead make ``stages`` a plain list (or a
property returning one) of callables over modules registered under those names, so that
``state_dict()`` has no duplicated keys. Wrappers should call ``forward_stage`` and read
``num_stages``, never index ``stages`` for its parameters.

A backbone of valid (unpadded) convolutions declares ``min_size``, the smallest height and
width it accepts (LeNet-5: 32); its stage outputs are then smaller than ``H / stride``, which
every architecture tolerates (dense heads resize to the image).

Images enter a backbone in [0, 1]; the built-in backbones standardise them themselves with
:class:`ImageNormalize` as the first step of stage 0 (ImageNet statistics), so datasets never
need to know which statistics a backbone was pretrained with. SegNet, which the MTAN protocol
trains from scratch on [0, 1] images (lorenmt/mtan), does not unless ``standardize: true``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

#: ImageNet channel statistics used by torchvision's pretrained weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNormalize(nn.Module):
    """``(x - mean) / std`` per channel, for images in [0, 1].

    The statistics are non-persistent buffers: they follow ``.to(device)`` but are not in the
    state dict, so checkpoints of a backbone keep exactly the keys of the original network.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Backbone(nn.Module):
    """A feature extractor made of sequential stages."""

    #: output channels of every stage
    stage_channels: list[int]
    #: cumulative output stride of every stage with respect to the input
    stage_strides: list[int]
    #: the smallest input height and width the backbone accepts
    min_size: int = 1

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList()

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def out_channels(self) -> int:
        return self.stage_channels[-1]

    def forward_stage(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.stages[i](x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i in range(self.num_stages):
            x = self.forward_stage(x, i)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_stages):
            x = self.forward_stage(x, i)
        return x


class MultiTaskModel(nn.Module):
    """Base class of every architecture."""

    tasks: list[str]
    #: True when ``encode``/``decode`` split the model at one shared representation
    has_representation: bool = False

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters used by every task (empty for single-task and soft-sharing models)."""
        raise NotImplementedError

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used by ``task`` alone."""
        raise NotImplementedError

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    def decode(self, rep: torch.Tensor, size: Sequence[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    #: the shared representation of the last forward (in the autograd graph), for balancers
    #: that take per-task gradients with respect to it; None for models without one
    representation: torch.Tensor | None = None

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        rep = self.encode(image)
        self.representation = rep
        return self.decode(rep, image.shape[-2:])

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: ``[{"params": [...], "lr_scale": s}, ...]``.

        ``lr_scale`` (default 1) multiplies ``optim.lr`` for that group; the first group is the
        one whose learning rate the trainer logs. Default: one group of every trainable
        parameter. Cross-stitch units, for instance, train at a higher rate (Misra et al. 2016).
        """
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def extra_loss(self) -> torch.Tensor | None:
        """An architecture's own regulariser (e.g. soft sharing's parameter distance), or None."""
        return None

    def deep_supervision(self) -> dict[str, list[tuple[float, torch.Tensor]]]:
        """Intermediate predictions of the last forward, for deep supervision (PAD-Net, MTI-Net).

        ``{task: [(weight, prediction), ...]}`` with every prediction shaped like the task's
        final one (at the image size). The trainer adds ``weight * task.loss(prediction,
        target)`` to that task's loss before balancing. Empty for most architectures.
        """
        return {}
