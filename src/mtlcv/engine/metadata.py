"""What a checkpoint says about its model, so that it can be used with nothing else.

The trainer stores :func:`describe`'s dict under ``"meta"`` in ``best.pt`` and ``last.pt``.
With it, :func:`mtlcv.load`, ``mtlcv predict`` and ``mtlcv export`` rebuild the network without
the config file, the dataset or the code that trained it. Everything in it is a plain Python
value (str, int, float, bool, None, list, dict), so a checkpoint that holds it still loads with
``torch.load(..., weights_only=True)``.

Format 1::

    format          1 (a reader refuses a format newer than it knows)
    mtlcv_version   the version that wrote the checkpoint
    name            the experiment's name
    model           {arch, backbone: {name, ...}, head: {name, ...}, options: {...}}
    tasks           {name: {kind, options, channels, dense, class_names}} in the model's order;
                    kind is the registered task that scores the name (``left`` may be a
                    ``classification``), options the task's factory options (``num_classes``)
    input           {size: [H, W] the model was trained at (None if unknown), channels: "RGB",
                    range: [0.0, 1.0], normalization: {mean, std} or None, applied_by: "model"}
    dataset         {name, options}: where the model was trained (informational)

Images enter every built-in model as RGB floats in [0, 1]; the model standardises them itself
(:class:`~mtlcv.models.base.ImageNormalize`), so ``normalization`` documents what happens inside
the network (and inside an exported graph) rather than asking the caller to do it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from .. import __version__
from ..config import ExperimentConfig, to_dict
from ..errors import CheckpointError

#: the metadata format this mtlcv writes and the newest it reads
FORMAT = 1


def _plain(value: Any, what: str) -> Any:
    """``value`` as plain JSON types (tuples become lists); a non-plain value is a bug here."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:  # pragma: no cover - a config holds YAML values
        raise TypeError(f"checkpoint metadata {what} is not plain data: {exc}") from None


def input_size(dataset: Any) -> list[int] | None:
    """``[H, W]`` of the first image of ``dataset``, or None when it has none or cannot say."""
    try:
        if len(dataset) == 0:
            return None
        shape = dataset[0]["image"].shape
    except Exception:  # noqa: BLE001 - informational: a dataset that cannot say gives None
        return None
    return [int(shape[-2]), int(shape[-1])]


def normalization(model: nn.Module) -> dict[str, list[float]] | None:
    """The mean/std the model applies to its [0, 1] input (None when it applies none).

    Read from the model's :class:`~mtlcv.models.base.ImageNormalize` modules; architectures
    with one backbone per task have several, all with the same statistics.
    """
    from ..models.base import ImageNormalize

    stats = {
        (tuple(m.mean.flatten().tolist()), tuple(m.std.flatten().tolist()))
        for m in model.modules()
        if isinstance(m, ImageNormalize)
    }
    if len(stats) != 1:
        return None
    mean, std = stats.pop()
    return {"mean": [round(v, 6) for v in mean], "std": [round(v, 6) for v in std]}


def describe(
    cfg: ExperimentConfig, tasks: Mapping[str, Any], dataset: Any, model: nn.Module
) -> dict[str, Any]:
    """The checkpoint metadata of a model built from ``cfg`` (see the module docstring).

    ``tasks`` is :func:`~mtlcv.engine.experiment.build_tasks`'s dict (each task carries its
    ``kind`` and ``options``) and ``dataset`` a split of the training data (its first image
    gives the input size; its optional ``class_names`` name the classes).
    """
    names = getattr(dataset, "class_names", {}) or {}
    meta = {
        "format": FORMAT,
        "mtlcv_version": __version__,
        "name": cfg.name,
        "model": {
            "arch": cfg.model.arch,
            "backbone": dict(cfg.model.backbone),
            "head": dict(cfg.model.head),
            "options": dict(cfg.model.options),
        },
        "tasks": {
            n: {
                "kind": getattr(t, "kind", n),
                "options": dict(getattr(t, "options", {})),
                "channels": int(t.channels),
                "dense": bool(t.dense),
                "class_names": list(names[n]) if n in names else None,
            }
            for n, t in tasks.items()
        },
        "input": {
            "size": input_size(dataset),
            "channels": "RGB",
            "range": [0.0, 1.0],
            "normalization": normalization(model),
            "applied_by": "model",
        },
        "dataset": {"name": cfg.data.name, "options": to_dict(cfg)["data"]["options"]},
    }
    return _plain(meta, "of this model")


def check(meta: Any, where: str) -> dict[str, Any]:
    """Return ``meta`` if this mtlcv can read it, else raise a one-line CheckpointError."""
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise CheckpointError(f"{where}: its metadata is not an mtlcv checkpoint description")
    if meta["format"] > FORMAT:
        raise CheckpointError(
            f"{where} was written by mtlcv {meta.get('mtlcv_version', '?')} (checkpoint format "
            f"{meta['format']}); this mtlcv {__version__} reads format {FORMAT} at most: upgrade "
            "mtlcv"
        )
    for key in ("model", "tasks", "input"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{where}: its metadata has no {key!r} entry")
    return meta
