"""Evaluation over a whole split with streaming metrics.

Every task's metric accumulates over all batches of the split and is computed once at the end,
so the numbers do not depend on batch size or order (see :mod:`mtlcv.tasks.base`). With
``protocol="published"`` the tasks that the papers' code averages over batches do so instead
(see :mod:`mtlcv.engine.protocol`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..tasks.base import Task

Metrics = dict[str, dict[str, float]]


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def check_batch(batch: Mapping[str, Any], tasks: Mapping[str, Task]) -> None:
    """Raise DataError (naming the task and both shapes) when a target breaks the contract."""
    image = batch["image"]
    for name, task in tasks.items():
        task.check_target(batch[name], image)


def _progress_bar(description: str | None, total: int | None) -> Any:
    """A transient rich progress bar over the batches, or None (no description, no terminal)."""
    if description is None or not sys.stdout.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True
    )
    bar.add_task(description, total=total)
    return bar


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tasks: Mapping[str, Task],
    loader: Iterable[Mapping[str, Any]],
    device: torch.device,
    protocol: str = "exact",
    progress: str | None = None,
) -> Metrics:
    """Run ``model`` over ``loader``; return ``{task: {metric: value}}`` over the whole split.

    ``progress``: a description (e.g. ``"val"``) shows a progress bar over the batches when
    stdout is a terminal; None shows nothing.

    With several processes (engine/distributed.py) ``loader`` is this process's shard of the
    split; the metrics' states are merged exactly across processes before computing (the
    published protocol's batch means included, see :mod:`mtlcv.engine.protocol`).
    """
    from .distributed import merge_metrics
    from .protocol import new_metric

    was_training = model.training
    model.eval()
    metrics = {name: new_metric(task, protocol) for name, task in tasks.items()}
    bar = _progress_bar(progress, len(loader) if hasattr(loader, "__len__") else None)
    if bar is not None:
        bar.start()
    try:
        for batch in loader:
            batch = to_device(batch, device)
            check_batch(batch, tasks)  # every batch: a bad label is one line, not a crash
            preds = model(batch["image"])
            for name in tasks:
                metrics[name].update(preds[name], batch[name])
            if bar is not None:
                bar.advance(bar.task_ids[0])
    finally:
        if bar is not None:
            bar.stop()
        model.train(was_training)
    return merge_metrics(metrics)
