"""Build every piece of an experiment (data, tasks, model, balancer, optimizer) from a config.

This is the one place where config names become objects, always through the registries, so
the trainer itself never branches on a method, architecture or dataset name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..analysis.baselines import get_baseline
from ..config import ExperimentConfig
from ..data.base import collate
from ..errors import ConfigError, DataError, MtlcvError
from ..registry import DATASETS, TASKS
from ..tasks.base import Task


@dataclass
class Experiment:
    cfg: ExperimentConfig
    tasks: dict[str, Task]
    datasets: dict[str, Any]
    model: torch.nn.Module
    balancer: Any
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"config key 'train.device': got {name!r}, expected auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': cuda was asked for but none is available")
    return dev


def build_dataset(cfg: ExperimentConfig, split: str, augment: bool = True) -> Any:
    """Split ``split`` of the config's dataset; ``data.augment`` applies to the training split
    only, and never when ``augment`` is False (evaluation)."""
    d = cfg.data
    try:
        ds = DATASETS.create(
            d.name,
            where="data.name",
            split=split,
            root=d.root,
            augment=augment and d.augment and split == "train",
            **d.options,
        )
    except OSError as exc:  # a file-system problem with the data: one line naming the path
        path = exc.filename or d.root
        reason = exc.strerror or type(exc).__name__
        raise DataError(
            f"data ({d.name!r}, split {split}): cannot use {str(path)!r}: {reason}"
        ) from None
    missing = [t for t in cfg.tasks if t not in getattr(ds, "targets", ())]
    if missing:
        raise ConfigError(
            f"config key 'tasks': dataset {d.name!r} has no target for {', '.join(missing)}; "
            f"it provides {', '.join(getattr(ds, 'targets', ())) or 'nothing'}"
        )
    return ds


def build_tasks(cfg: ExperimentConfig, dataset: Any) -> dict[str, Task]:
    """One :class:`Task` per name in ``cfg.tasks``.

    A name is scored by the task kind the dataset declares for it in ``task_kinds`` (two
    classification tasks ``left`` and ``right``), else by the registered task of that name; the
    task object carries the name (its batch key and prediction key) in ``task.name``, the
    registered kind in ``task.kind``, its factory options in ``task.options``, and
    ``task.auxiliary`` is True for the names in ``cfg.aux_tasks``.
    """
    opts = getattr(dataset, "task_options", {}) or {}
    kinds = getattr(dataset, "task_kinds", {}) or {}
    tasks = {}
    for t in cfg.tasks:
        kind, options = kinds.get(t, t), dict(opts.get(t, {}))
        task = TASKS.create(kind, where="tasks", **options)
        # name, kind and options are what a checkpoint records to rebuild the task (metadata.py)
        task.name, task.kind, task.options = t, kind, options
        task.auxiliary = t in cfg.aux_tasks
        tasks[t] = task
    return tasks


def check_input_size(
    cfg: ExperimentConfig, model: torch.nn.Module, dataset: Any, device: torch.device
) -> None:
    """Run ``model`` once on one blank image of the dataset's size; a ConfigError naming the
    architecture, the backbone and the size when it cannot process it (e.g. SegNet's unpooling
    with a size not divisible by its stride), instead of a traceback at the first step."""
    if len(dataset) == 0:
        return
    with torch.random.fork_rng(devices=[]):  # an augmenting dataset draws from the global RNG
        image = dataset[0]["image"]
    size = tuple(image.shape[-2:])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image.shape, device=device, dtype=image.dtype))
    except (RuntimeError, ValueError) as exc:
        backbone = cfg.model.backbone.get("name")
        raise ConfigError(
            f"model.arch {cfg.model.arch!r} with backbone {backbone!r} cannot process "
            f"{size[0]}x{size[1]} images ({str(exc).splitlines()[0][:120]}); use larger images "
            "or a backbone that downsamples less"
        ) from None
    finally:
        model.train(was)


def build_model(cfg: ExperimentConfig, tasks: dict[str, Task]) -> torch.nn.Module:
    from ..models.build import build_model as _build

    return _build(
        cfg.model.arch,
        tasks,
        backbone=dict(cfg.model.backbone),
        head=dict(cfg.model.head),
        options=dict(cfg.model.options),
    )


def build_balancer(cfg: ExperimentConfig) -> Any:
    from ..balancing import create

    if "num_tasks" in cfg.balancer.options:
        raise ConfigError(
            "config key 'balancer.options.num_tasks': set from 'tasks' "
            f"({len(cfg.tasks)}); remove it"
        )
    return create(cfg.balancer.name, num_tasks=len(cfg.tasks), **cfg.balancer.options)


def optimizer_groups(model: torch.nn.Module, balancer: Any) -> list[dict[str, Any]]:
    """The parameter groups the trainer optimises.

    The model's own groups (``model.parameter_groups()``: e.g. cross-stitch units at
    ``lr_scale`` times the learning rate), then the balancer's learnable parameters (uncertainty
    weighting's log-variances, GradNorm's weights ...) with no weight decay (as in the MTAN,
    Nash-MTL and FAMO runs, which use none; LibMTL decays them with everything else) and, when the
    balancer sets ``param_lr``, their own learning rate (Nash-MTL's code trains them at 0.025).
    """
    if hasattr(model, "parameter_groups"):
        groups = [dict(g) for g in model.parameter_groups()]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    own = [p for p in balancer.parameters() if p.requires_grad]
    if own:
        group: dict[str, Any] = {"params": own, "weight_decay": 0.0}
        if getattr(balancer, "param_lr", None) is not None:
            group["lr"] = float(balancer.param_lr)
        groups.append(group)
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: ExperimentConfig, params: list) -> torch.optim.Optimizer:
    """The optimizer of ``optim`` over ``params``: tensors, or groups as
    :func:`optimizer_groups` returns them (``lr_scale`` multiplies ``optim.lr``; ``lr`` and
    ``weight_decay`` given in a group override ``optim``'s)."""
    o = cfg.optim
    groups = []
    for g in params:
        if not isinstance(g, dict):
            groups.append(g)
            continue
        g = dict(g)
        scale = float(g.pop("lr_scale", 1.0))
        g.setdefault("lr", o.lr * scale)
        groups.append(g)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_scheduler(cfg: ExperimentConfig, opt: torch.optim.Optimizer) -> Any:
    s = cfg.schedule
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def make_loader(
    cfg: ExperimentConfig,
    ds: Any,
    train: bool,
    seed: int = 0,
    *,
    epoch: int = 0,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """The loader of one split for this process.

    Training: the order of epoch ``epoch`` is drawn from ``seed`` (the trainer passes
    ``cfg.seed + epoch``), global batches of ``batch_size * world`` samples, this process's part
    of each (:class:`~mtlcv.engine.distributed.ShardedBatchSampler`), starting at global batch
    ``start`` (mid-epoch resume); each sample's augmentation is drawn from ``(seed, epoch,
    index)`` (:class:`~mtlcv.engine.distributed.SampleSeeded`), so it depends neither on the
    process, the worker nor the position. Evaluation: in order, in the batches one process
    would form; process ``rank`` takes the ``rank``-th contiguous run of them (every sample
    exactly once, no padding), so merging the processes' metric states in rank order sees the
    split in its order and batches (exact for the published protocol's batch means and for
    score ties in detection's mAP). Batches are formed by :func:`mtlcv.data.base.collate`
    (targets that are not fixed-size tensors, e.g. detection boxes, batch themselves).
    """
    from .distributed import SampleSeeded, ShardedBatchSampler, split_evenly

    bs = cfg.data.batch_size if train else (cfg.data.eval_batch_size or cfg.data.batch_size)
    # page-locked batches copy to a GPU asynchronously (to_device's non_blocking); the eval
    # loaders live as long as the trainer, so their workers may too (the training loader is
    # made anew each epoch, for its epoch's order and augmentation seeds)
    pin = torch.cuda.is_available() and not str(cfg.train.device).startswith("cpu")
    persistent = cfg.data.num_workers > 0 and not train
    gen = torch.Generator()  # the workers' base seed
    gen.manual_seed(int(seed) % 2**64)
    if train:
        sampler = ShardedBatchSampler(len(ds), bs, seed=seed, world=world, rank=rank, start=start)
        return DataLoader(
            SampleSeeded(ds, seed, epoch),
            batch_sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,  # targets that are not fixed-size tensors batch themselves
            generator=gen,
            pin_memory=pin,
            persistent_workers=False,
        )
    if world > 1:
        n = len(ds)
        mine = split_evenly(range(math.ceil(n / bs)), world)[rank]
        batches = [list(range(k * bs, min((k + 1) * bs, n))) for k in mine]
        return DataLoader(
            ds,
            batch_sampler=batches,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            generator=gen,
            pin_memory=pin,
            persistent_workers=persistent,
        )
    return DataLoader(
        ds,
        batch_size=bs,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        generator=gen,
        pin_memory=pin,
        persistent_workers=persistent,
    )


def build(
    cfg: ExperimentConfig,
    splits: tuple[str, ...] = ("train", "val", "test"),
    augment: bool = True,
    device: torch.device | None = None,
) -> Experiment:
    """Every piece of ``cfg`` on ``device`` (default: ``train.device`` resolved);
    ``augment=False`` builds even the training split without augmentation (for evaluation)."""
    datasets = {s: build_dataset(cfg, s, augment) for s in splits}
    tasks = build_tasks(cfg, datasets[splits[0]])
    model = build_model(cfg, tasks)
    balancer = build_balancer(cfg)
    device = resolve_device(cfg.train.device) if device is None else device
    return Experiment(cfg, tasks, datasets, model.to(device), balancer.to(device), device)


def load_baselines(spec: str) -> dict[str, dict[str, dict[str, float]]]:
    """Baselines for Δm: ``{"val": {...}, "test": {...}}`` from a run dir, a results.json or a name.

    A named published baseline has only test numbers; they are used for both splits.
    """
    path = Path(spec)
    if path.is_dir():
        path = path / "results.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config key 'baselines': {str(path)!r} does not exist")
        try:
            res = json.loads(path.read_text())
            return {"val": res.get("val") or res["test"], "test": res["test"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(
                f"config key 'baselines': {str(path)!r} is not a results.json with 'test' metrics"
            ) from None
    try:
        metrics = get_baseline(spec)
    except MtlcvError as exc:
        raise ConfigError(
            f"config key 'baselines': {spec!r} is not a file, a run directory or a named baseline "
            f"({exc})"
        ) from None
    return {"val": metrics, "test": metrics}
