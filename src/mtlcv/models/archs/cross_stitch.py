"""Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for
Multi-task Learning", CVPR 2016, Sec. 3 and eq. 1).

One backbone per task; after every stage a cross-stitch unit replaces each task's activation by a
learned linear combination of all tasks' activations at that stage::

    x~_i = sum_j alpha_ij x_j

``mode: scalar`` learns one alpha per task pair (the paper's T x T matrix); ``mode: channel``
one per task pair and channel (the channel-wise variant of Vandenhende et al., TPAMI 2021).
The units start at ``alpha_self = 0.9`` on the diagonal and ``alpha_other = 0.1`` elsewhere, as
given (Misra et al. sec. 4: (0.9, 0.1); the survey code SimonVandenhende/Multi-Task-Learning-
PyTorch ``models/cross_stitch.py`` fills them so, unnormalised, for any number of tasks);
``normalize_init: true`` divides each row by its sum instead (convex combinations). The units
train at ``lr_scale = 100`` times the learning rate: Misra et al. (sec. 4) scale the units'
learning rate by 10^2 to 10^3, the survey code by 100 (``utils/common_config.py``,
``get_optimizer``); with the base rate they barely move. ``init_from: {task: source}`` starts
each task's backbone (and head, where present) from a trained single-task network, as the paper
does: ``source`` is an ``stl`` run's ``best.pt``/``last.pt``, a saved state dict, or a state dict
itself (keys ``nets.<task>.backbone.*`` of an stl model, ``backbone.*``/``head.*``, or bare
backbone keys).

Parameters: every backbone reaches every task through the units, so the backbones and the units
are shared; task ``t`` owns only its head. No single shared representation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import ARCHS
from ..base import MultiTaskModel
from .stl import SingleTaskNet

MODES = ("scalar", "channel")


class CrossStitchUnit(nn.Module):
    """``x~_i = sum_j alpha_ij x_j`` over the T task activations of one stage (Misra eq. 1)."""

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        mode: str,
        alpha_self: float,
        alpha_other: float,
        normalize_init: bool = False,
    ) -> None:
        super().__init__()
        T = num_tasks
        a = torch.full((T, T), float(alpha_other))
        a.fill_diagonal_(float(alpha_self))
        if normalize_init:
            a = a / a.sum(1, keepdim=True)
        self.mode = mode
        self.alpha = nn.Parameter(a if mode == "scalar" else a[:, :, None].repeat(1, 1, channels))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.stack(xs)  # [T, B, C, H, W]
        eq = "ij,jbchw->ibchw" if self.mode == "scalar" else "ijc,jbchw->ibchw"
        return list(torch.einsum(eq, self.alpha.to(x.dtype), x).unbind(0))


def _load_state(source: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        obj: Any = source
    elif isinstance(source, (str, os.PathLike)):
        from ...engine.checkpoint import load_checkpoint  # engine imports models, not vice versa

        try:
            obj = load_checkpoint(os.path.expanduser(source))
        except Exception as exc:  # noqa: BLE001 - missing and unreadable files alike
            raise ConfigError(f"{where}: {exc}") from None
    else:
        raise ConfigError(f"{where}: got {source!r}, expected a checkpoint path or a state dict")
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # a trainer checkpoint
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: holds {type(obj).__name__}, expected a state dict")
    return dict(obj)


def load_single_task(net: SingleTaskNet, task: str, source: Any, where: str) -> None:
    """Copy a trained single-task network (see the module docstring) into ``net``."""
    state = _load_state(source, where)
    prefix = f"nets.{task}."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    elif any(k.startswith("nets.") for k in state):
        have = sorted({k.split(".")[1] for k in state if k.startswith("nets.")})
        raise ConfigError(f"{where}: has no network for task {task!r}; it has {', '.join(have)}")
    parts = {"backbone": {}, "head": {}}
    for k, v in state.items():
        part, _, rest = k.partition(".")
        if part in parts:
            parts[part][rest] = v
    if not parts["backbone"]:  # bare backbone keys
        parts = {"backbone": state, "head": {}}
    for part, sd in parts.items():
        if not sd:
            continue
        try:
            getattr(net, part).load_state_dict(sd)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise ConfigError(f"{where}: the {part} does not match this model ({first})") from None


@ARCHS.register("cross_stitch")
class CrossStitch(MultiTaskModel):
    """One backbone per task, mixed by cross-stitch units after every stage (Misra et al. 2016)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        mode: str = "scalar",
        alpha_self: float = 0.9,
        alpha_other: float = 0.1,
        init_from: Mapping[str, Any] | None = None,
        lr_scale: float = 100.0,
        normalize_init: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(
                f"model.options.mode: got {mode!r}, expected one of {', '.join(MODES)}"
            )
        T = len(tasks)
        ok = all(isinstance(a, (int, float)) and not isinstance(a, bool) and a >= 0
                 for a in (alpha_self, alpha_other))
        if not ok or alpha_self + (T - 1) * alpha_other <= 0:
            raise ConfigError(
                f"model.options: alpha_self={alpha_self!r}, alpha_other={alpha_other!r}; "
                "expected non-negative numbers with a positive row sum"
            )
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or lr_scale <= 0:
            raise ConfigError(f"model.options.lr_scale: got {lr_scale!r}, expected a number > 0")
        if not isinstance(normalize_init, bool):
            raise ConfigError(
                f"model.options.normalize_init: got {normalize_init!r}, expected true or false"
            )
        self.lr_scale = float(lr_scale)
        self.tasks = list(tasks)
        nets = {t: SingleTaskNet(task, backbone, head) for t, task in tasks.items()}
        bb = nets[self.tasks[0]].backbone
        # units first: the last shared weight in parameter order is then a backbone layer
        self.stitch = nn.ModuleList(
            CrossStitchUnit(T, c, mode, alpha_self, alpha_other, normalize_init)
            for c in bb.stage_channels
        )
        self.nets = nn.ModuleDict(nets)
        for t, source in (init_from or {}).items():
            where = f"model.options.init_from.{t}"
            if t not in nets:
                raise ConfigError(
                    f"{where}: {t!r} is not a task of this model ({', '.join(self.tasks)})"
                )
            load_single_task(nets[t], t, source, where)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The networks at the base learning rate, the units at ``lr_scale`` times it."""
        units = {id(p) for p in self.stitch.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in units]
        stitch = [p for p in self.stitch.parameters() if p.requires_grad]
        return [{"params": rest}, {"params": stitch, "lr_scale": self.lr_scale}]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.stitch.parameters()
        for t in self.tasks:
            yield from self.nets[t].backbone.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.nets[task].head.parameters()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        xs = [image] * len(self.tasks)
        for i, unit in enumerate(self.stitch):
            xs = unit([self.nets[t].backbone.forward_stage(x, i) for t, x in zip(self.tasks, xs)])
        return {t: self.nets[t].head(x, image.shape[-2:]) for t, x in zip(self.tasks, xs)}
