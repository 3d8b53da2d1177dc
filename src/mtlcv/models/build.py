"""Building models from config: ``{name: ..., **options}`` mappings -> modules, via the registries.

``build_model("hps", tasks, backbone={"name": "resnet18", "dilated": True},
head={"name": "aspp"}, options={})`` is what the experiment builder calls. Architectures build
their parts with :func:`build_backbone` and :func:`build_head`, so every arch accepts every
registered backbone and head. Unknown names and options raise a
:class:`~mtlcv.errors.ConfigError` naming ``model.arch``, ``model.backbone`` or ``model.head``.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> seg = SimpleNamespace(name="semseg", channels=13, dense=True)
    >>> model = build_model("hps", {"semseg": seg}, {"name": "tiny", "width": 8}, {"name": "light"})
    >>> model(torch.rand(2, 3, 32, 48))["semseg"].shape
    torch.Size([2, 13, 32, 48])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError
from ..registry import ARCHS, BACKBONES, HEADS, Registry
from .base import Backbone, MultiTaskModel
from .heads import ClassifierHead, TaskHead


def resolve(
    registry: Registry, spec: Any, where: str, fixed: tuple[str, ...] = ()
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Check ``spec`` = ``{name, **options}`` against ``registry``; return (factory, options).

    ``fixed`` are factory arguments the model supplies itself (e.g. a head's channels); a
    config that sets one is an error, and they are not offered as valid options.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{where}: got {spec!r}, expected a mapping with a 'name' string")
    name = spec["name"]
    options = {k: v for k, v in spec.items() if k != "name"}
    factory = registry.get(name, where=where)
    params = inspect.signature(factory).parameters
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [
        n
        for n, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in fixed
    ]
    for key in options:
        if key in fixed or not (any_kw or key in valid):
            raise ConfigError(
                f"{where} {name!r} has no option {key!r}; valid options: "
                f"{', '.join(valid) or '(none)'}"
            )
    return factory, options


def build_backbone(spec: Mapping[str, Any]) -> Backbone:
    """``{"name": "resnet18", "dilated": True}`` -> a :class:`Backbone` (``model.backbone``)."""
    factory, options = resolve(BACKBONES, spec, "model.backbone")
    return factory(**options)


def build_head(spec: Mapping[str, Any], in_channels: int, task: Any) -> TaskHead:
    """The :class:`TaskHead` of ``task`` (``.channels``, ``.dense``) on ``in_channels`` features.

    Image-level tasks get :class:`ClassifierHead` whatever ``spec`` names (see :mod:`.heads`).
    """
    fixed = ("in_channels", "out_channels")
    factory, options = resolve(HEADS, spec, "model.head", fixed)
    if not task.dense:
        return TaskHead(ClassifierHead(in_channels, task.channels), dense=False)
    return TaskHead(factory(in_channels, task.channels, **options), dense=True)


def build_model(
    arch: str,
    tasks: Mapping[str, Any],
    backbone: Mapping[str, Any],
    head: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
) -> MultiTaskModel:
    """Build architecture ``arch`` for ``tasks`` ({name: Task}) from the model config.

    Architectures are registered in :data:`mtlcv.registry.ARCHS` as
    ``factory(tasks, backbone, head, **options)``.
    """
    if not tasks:
        raise ConfigError("model: got no tasks, expected at least one")
    if not isinstance(arch, str):
        raise ConfigError(f"model.arch: got {arch!r}, expected a string")
    options = dict(options or {})
    if "name" in options:
        raise ConfigError("model.options: 'name' is not an architecture option; set model.arch")
    fixed = ("tasks", "backbone", "head")
    factory, opts = resolve(ARCHS, {"name": arch, **options}, "model.arch", fixed)
    return factory(tasks=dict(tasks), backbone=backbone, head=head, **opts)
