"""Model size and cost: parameter counts and forward FLOPs at a given resolution.

FLOPs follow the convention of the vision literature (He et al. 2016, Table 1: ResNet-18 has
"1.8 x 10^9 FLOPs" at 224x224), i.e. they count **multiply-accumulates** of the convolution and
linear layers, measured with forward hooks on one image: a ``Conv2d`` producing ``N`` output
elements costs ``N * (C_in / groups) * k_h * k_w``, a ``Linear`` ``N * in_features``.
Normalisation, activations, pooling, interpolation and element-wise products (attention masks,
cross-stitch mixing) are not counted; they are a few percent of the total for these models.

Example:
    >>> from torch import nn
    >>> count_flops(nn.Conv2d(3, 8, 3, padding=1), size=(10, 10))  # 8*10*10 outputs x 27 MACs
    21600
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters (each shared tensor once); ``trainable`` counts only those with grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def count_flops(model: nn.Module, size: Sequence[int] = (96, 128)) -> int:
    """Multiply-accumulates of one forward pass of a single ``[1, 3, H, W]`` image."""
    total = 0

    def conv_hook(m: nn.Conv2d, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    mode = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            model(torch.rand(1, 3, *size, device=device))
    finally:
        model.train(mode)
        for h in handles:
            h.remove()
    return total


def arch_size(
    name: str,
    size: Sequence[int] = (96, 128),
    tasks: Sequence[str] = ("semseg", "depth", "normals"),
    backbone: str = "tiny",
) -> dict:
    """Parameters and FLOPs (multiply-accumulates) of architecture ``name`` built for ``tasks``.

    Uses the tasks' default options (13 semseg classes), the named backbone with its defaults
    and the ``light`` head. Returns ``{"parameters", "flops", "size", "backbone", "tasks"}``,
    or, when the architecture cannot be built on that backbone, ``"error"`` saying why instead
    of the counts.
    """
    from ..errors import MtlcvError
    from ..registry import TASKS
    from .build import build_model

    task_objs = {t: TASKS.create(t, where="tasks") for t in tasks}
    out: dict = {"size": list(size), "backbone": backbone, "tasks": list(tasks)}
    try:
        model = build_model(name, task_objs, {"name": backbone}, {"name": "light"})
    except MtlcvError as exc:
        return out | {"error": str(exc)}
    return out | {"parameters": count_parameters(model), "flops": count_flops(model, size)}


def format_size(info: dict) -> str:
    """One line of :func:`arch_size`'s result, as ``mtlcv list`` prints it."""
    if "error" in info:
        return f"n/a on {info['backbone']}: {info['error']}"
    h, w = info["size"]
    return (
        f"{info['parameters'] / 1e6:.2f} M params, {info['flops'] / 1e9:.2f} GFLOPs at {h}x{w} "
        f"({info['backbone']}, {len(info['tasks'])} tasks)"
    )


def describe_arch(
    name: str,
    size: Sequence[int] = (96, 128),
    tasks: Sequence[str] = ("semseg", "depth", "normals"),
    backbone: str = "tiny",
) -> str:
    """One line for ``mtlcv list``: parameters and GFLOPs of ``name`` built for ``tasks``
    (see :func:`arch_size`); an architecture that cannot be built on that backbone says why."""
    return format_size(arch_size(name, size, tasks, backbone))
