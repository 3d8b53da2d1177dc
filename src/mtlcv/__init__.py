"""mtlcv: multi-task learning for dense computer vision.

The public API (see ``docs/api.md``)::

    import mtlcv
    tasks = [mtlcv.create_task("semseg"), mtlcv.create_task("depth")]
    model = mtlcv.create_model("hps", tasks, backbone="resnet18")
    balancer = mtlcv.create_balancer("pcgrad", num_tasks=len(tasks))
    results = mtlcv.train("configs/scenes/hps.yaml", overrides=["train.epochs=2"])

Names are imported on first use, so ``import mtlcv`` does not import PyTorch.
"""

from __future__ import annotations

import importlib

# not `from typing import TYPE_CHECKING`: importing typing would double `import mtlcv`'s time;
# type checkers treat any name TYPE_CHECKING as true
TYPE_CHECKING = False

__version__ = "0.1.0"

#: public name -> the module that defines it (imported lazily by ``__getattr__``)
_EXPORTS: dict[str, str] = {
    # building and running (mtlcv/api.py)
    "available": "mtlcv.api",
    "create_task": "mtlcv.api",
    "create_tasks": "mtlcv.api",
    "create_model": "mtlcv.api",
    "create_balancer": "mtlcv.api",
    "create_dataset": "mtlcv.api",
    "create_loader": "mtlcv.api",
    "task_losses": "mtlcv.api",
    "evaluate": "mtlcv.api",
    "load_config": "mtlcv.api",
    "train": "mtlcv.api",
    # a trained run, ready to predict (mtlcv/inference)
    "load": "mtlcv.inference",
    # numbers
    "delta_m": "mtlcv.analysis.delta_m",
    "mean_rank": "mtlcv.analysis.delta_m",
    # the contracts, for subclassing (see docs/design.md)
    "ExperimentConfig": "mtlcv.config",
    "Task": "mtlcv.tasks.base",
    "Metric": "mtlcv.tasks.base",
    "MultiTaskModel": "mtlcv.models.base",
    "Backbone": "mtlcv.models.base",
    "MTLDataset": "mtlcv.data.base",
    "Balancer": "mtlcv.balancing.base",
    "Weighting": "mtlcv.balancing.base",
    "GradientBalancer": "mtlcv.balancing.base",
    # errors
    "MtlcvError": "mtlcv.errors",
    "ConfigError": "mtlcv.errors",
    "DataError": "mtlcv.errors",
    "CheckpointError": "mtlcv.errors",
}

#: the public names (a test checks it matches _EXPORTS)
__all__ = [
    "__version__",
    "available",
    "create_task",
    "create_tasks",
    "create_model",
    "create_balancer",
    "create_dataset",
    "create_loader",
    "task_losses",
    "evaluate",
    "load_config",
    "train",
    "load",
    "delta_m",
    "mean_rank",
    "ExperimentConfig",
    "Task",
    "Metric",
    "MultiTaskModel",
    "Backbone",
    "MTLDataset",
    "Balancer",
    "Weighting",
    "GradientBalancer",
    "MtlcvError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mtlcv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .analysis.delta_m import delta_m, mean_rank
    from .api import (
        available,
        create_balancer,
        create_dataset,
        create_loader,
        create_model,
        create_task,
        create_tasks,
        evaluate,
        load_config,
        task_losses,
        train,
    )
    from .balancing.base import Balancer, GradientBalancer, Weighting
    from .config import ExperimentConfig
    from .data.base import MTLDataset
    from .errors import CheckpointError, ConfigError, DataError, MtlcvError
    from .inference import load
    from .models.base import Backbone, MultiTaskModel
    from .tasks.base import Metric, Task
