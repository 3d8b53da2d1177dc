"""The public Python API, re-exported by :mod:`mtlcv` (``mtlcv.create_model`` ...).

Every component is built by name through the registries (:mod:`mtlcv.registry`), exactly as
the config-driven trainer builds it, so a model, task or balancer made here is the one a
``mtlcv train`` run would use. ``docs/api.md`` documents each function with examples that the
test suite runs.

Example:
    >>> import torch, mtlcv
    >>> tasks = [mtlcv.create_task("semseg", num_classes=13), mtlcv.create_task("depth")]
    >>> model = mtlcv.create_model("hps", tasks, backbone={"name": "tiny", "width": 8})
    >>> balancer = mtlcv.create_balancer("upgrad", num_tasks=len(tasks))
    >>> preds = model(torch.rand(2, 3, 32, 48))
    >>> {name: tuple(p.shape) for name, p in preds.items()}
    {'semseg': (2, 13, 32, 48), 'depth': (2, 1, 32, 48)}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .balancing.base import Balancer
    from .config import ExperimentConfig
    from .models.base import MultiTaskModel
    from .tasks.base import Task

__all__ = [
    "available",
    "create_balancer",
    "create_dataset",
    "create_loader",
    "create_model",
    "create_task",
    "create_tasks",
    "evaluate",
    "load_config",
    "task_losses",
    "train",
]


def available(kind: str | None = None) -> Any:
    """Registered component names: ``available("balancer")`` -> a sorted list of names;
    ``available()`` -> ``{kind: [names]}`` for task, dataset, backbone, head, architecture and
    balancer (what ``mtlcv list`` prints)."""
    from .registry import ALL

    if kind is None:
        return {k: reg.names() for k, reg in ALL.items()}
    if kind not in ALL:
        raise ConfigError(f"unknown component kind {kind!r}; valid: {', '.join(ALL)}")
    return ALL[kind].names()


def create_task(kind: str, *, name: str | None = None, **options: Any) -> Task:
    """The task registered as ``kind`` (``semseg``, ``depth``, ``normals``, ``edges``,
    ``classification``), built with its ``options`` (e.g. ``num_classes=13``).

    ``name`` is the task's key in batches and predictions (default: ``kind``); two tasks of one
    kind need two names, e.g. ``create_task("classification", name="left", num_classes=10)``.
    """
    from .registry import TASKS

    task = TASKS.create(kind, where="tasks", **options)
    task.name = kind if name is None else name
    return task


def create_tasks(names: Sequence[str], dataset: Any = None) -> dict[str, Task]:
    """``{name: Task}`` for the task ``names`` of ``dataset``, as the trainer builds them: each
    task gets the options the dataset declares (``task_options``, e.g. the number of classes)
    and the kind it declares (``task_kinds``, for tasks named other than their kind)."""
    from .config import from_dict
    from .engine.experiment import build_tasks

    return build_tasks(from_dict({"tasks": list(names)}), dataset)


def _spec(value: str | Mapping[str, Any], what: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"{what}: got {value!r}, expected a name or a mapping with a 'name'")


def create_model(
    arch: str,
    tasks: Mapping[str, Task] | Sequence[Task],
    backbone: str | Mapping[str, Any] = "tiny",
    head: str | Mapping[str, Any] = "light",
    **options: Any,
) -> MultiTaskModel:
    """The architecture ``arch`` (``stl``, ``hps``, ``mtan``, ...) for ``tasks``.

    Args:
        arch: a registered architecture (``mtlcv.available("architecture")``).
        tasks: ``{name: Task}`` or a sequence of tasks (keyed by ``task.name``).
        backbone: a backbone name or ``{"name": ..., **options}``, e.g.
            ``{"name": "resnet18", "dilated": True}`` (``model.backbone`` of a config).
        head: a head name or ``{"name": ..., **options}`` (``model.head``).
        **options: the architecture's own options (``model.options``), e.g. ``reduction=1``.

    Returns:
        A :class:`~mtlcv.models.base.MultiTaskModel`: ``model(images)`` is ``{task: prediction}``.
    """
    from .models.build import build_model

    if not isinstance(tasks, Mapping):
        tasks = {t.name: t for t in tasks}
    return build_model(
        arch,
        tasks,
        backbone=_spec(backbone, "model.backbone"),
        head=_spec(head, "model.head"),
        options=options,
    )


def create_balancer(name: str, num_tasks: int, **options: Any) -> Balancer:
    """The balancer registered as ``name`` for ``num_tasks`` tasks, with its ``options``.

    After ``balancer.backward(losses, model)`` (``losses``: the ``[T]`` per-task losses) every
    parameter's ``.grad`` holds the update; a loss weighting ignores ``model``, a gradient
    method needs it. Learnable balancers (``uncertainty``, ``imtl-l``) have parameters to give
    the optimizer: ``list(balancer.parameters())``.
    """
    from .balancing import create

    return create(name, num_tasks=num_tasks, **options)


def create_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    augment: bool = False,
    **options: Any,
) -> Any:
    """One split of the dataset registered as ``name`` (``scenes``, ``nyuv2``, ...).

    Items are dicts: ``image`` float ``[3, H, W]`` in [0, 1] plus one target per task (see
    ``docs/design.md``); ``dataset.targets`` names the tasks it provides. ``options`` are the
    dataset's own (``data.options`` of a config), e.g. ``n=600, size=(96, 128)`` for scenes.
    """
    from .registry import DATASETS

    return DATASETS.create(
        name,
        where="data.name",
        split=split,
        root=None if root is None else str(root),
        augment=augment,
        **options,
    )


def create_loader(dataset: Any, batch_size: int = 8, shuffle: bool = False,
                  **kwargs: Any) -> torch.utils.data.DataLoader:
    """A ``torch.utils.data.DataLoader`` over ``dataset`` that batches every target, those that
    are not fixed-size tensors too (detection boxes pad themselves: :func:`mtlcv.data.collate`).
    ``kwargs`` go to the DataLoader (``num_workers``, ``drop_last``, ``generator``...)."""
    from torch.utils.data import DataLoader

    from .data.base import collate

    kwargs.setdefault("collate_fn", collate)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)


def task_losses(
    tasks: Mapping[str, Task] | Sequence[Task],
    preds: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    model: nn.Module | None = None,
) -> torch.Tensor:
    """The per-task losses ``[T]`` of one batch, in the order of ``tasks``.

    With ``model``, each task's loss also gets the model's deep-supervision terms of the last
    forward pass (PAD-Net's and MTI-Net's intermediate predictions), exactly as the trainer
    adds them; the vector is what ``balancer.backward`` takes.
    """
    import torch

    if not isinstance(tasks, Mapping):
        tasks = {t.name: t for t in tasks}
    aux = getattr(model, "deep_supervision", dict)() if model is not None else {}
    out = []
    for name, task in tasks.items():
        loss = task.loss(preds[name], batch[name])
        for weight, pred in aux.get(name, ()):
            loss = loss + weight * task.loss(pred, batch[name])
        out.append(loss)
    return torch.stack(out)


def evaluate(
    model: nn.Module,
    tasks: Mapping[str, Task] | Sequence[Task],
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` over every batch of ``loader`` (exact,
    split-level metrics; the model is put in eval mode and restored). ``device`` defaults to
    the model's."""
    import torch

    from .engine.evaluate import evaluate as _evaluate

    if not isinstance(tasks, Mapping):
        tasks = {t.name: t for t in tasks}
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    return _evaluate(model, tasks, loader, torch.device(device))


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """An :class:`~mtlcv.config.ExperimentConfig` from a YAML file (or the defaults) and
    ``--set``-style ``overrides`` such as ``"train.epochs=3"``, strictly validated."""
    from .config import load

    return load(path, list(overrides))


# `mtlcv.load(run)` (a trained run's model and tasks, ready for prediction) lives with the
# inference package (issue 12) and is exported from mtlcv/__init__.py next to these.


def train(
    config: str | Path | Mapping[str, Any] | ExperimentConfig | None = None,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train an experiment, as ``mtlcv train`` does; return its results (``results.json``).

    Args:
        config: a YAML file, a config dict (``{"tasks": [...], "model": {...}}``), an
            :class:`~mtlcv.config.ExperimentConfig`, or None for the defaults.
        out: the run directory (default ``runs/NAME-TIMESTAMP``).
        overrides: ``"key=value"`` strings applied on top (as ``--set``).
        resume: continue the run in ``out`` exactly.
        log: receives one line per epoch (default ``print``).
    """
    from .config import ExperimentConfig, apply_overrides, from_dict, load, to_dict
    from .engine.trainer import train as _train

    if isinstance(config, ExperimentConfig):
        cfg = from_dict(apply_overrides(to_dict(config), list(overrides)))
    elif isinstance(config, Mapping):
        cfg = from_dict(apply_overrides(dict(config), list(overrides)))
    else:
        cfg = load(config, list(overrides))
    if out is None:
        if resume:
            raise ConfigError("train(resume=True) needs out, the run directory to continue")
        out = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return _train(cfg, out, resume=resume, log=log)
