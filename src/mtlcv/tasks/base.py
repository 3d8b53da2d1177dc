"""The task contract.

A :class:`Task` declares everything the rest of the library needs to know about one prediction
problem, so that trainers, architectures and balancers never special-case a task:

* ``name``: the key of its target in a batch and of its prediction in a model's output;
* ``channels``: how many output channels its head produces;
* ``dense``: ``True`` for per-pixel tasks (prediction ``[B, C, H, W]``), ``False`` for
  image-level tasks (prediction ``[B, C]``);
* ``loss(pred, target)``: a scalar tensor, averaged over the valid elements of the batch;
* ``new_metric()``: a fresh streaming accumulator; metrics are computed over the whole split,
  never as means of per-batch values, so they do not depend on batch size or order;
* ``higher_is_better``: for every metric name, which way is better (used by Δm and ranks);
* ``check_target(target, image)``: raises :class:`~mtlcv.errors.DataError` naming the task and
  both shapes when a dataset returns a target of the wrong shape or dtype;
* ``kpi(metrics)``: a key performance indicator in [0, 1] (higher is better), used by Dynamic
  Task Prioritization.

Batch contract (GUIDE.md): ``image`` float ``[B,3,H,W]``; ``semseg`` long ``[B,H,W]`` with
255 = ignore; ``depth`` float ``[B,1,H,W]`` with 0 = missing; ``normals`` float ``[B,3,H,W]``
unit vectors in the camera frame (x right, y down, z forward) with 0 = missing; ``edges`` float
``[B,1,H,W]`` in {0, 1} with 255 = ignore; ``classification`` long ``[B]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Metric(ABC):
    """A streaming metric: ``update`` on every batch, ``compute`` once at the end of the split."""

    @abstractmethod
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...


class Task(ABC):
    name: str
    channels: int
    dense: bool = True
    #: metric name -> True when a higher value is better
    higher_is_better: dict[str, bool]
    #: the metric used for model selection summaries and tables, in display order
    primary_metrics: tuple[str, ...] = ()

    @abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def new_metric(self) -> Metric: ...

    @abstractmethod
    def check_target(self, target: torch.Tensor, image: torch.Tensor) -> None: ...

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Map the raw head output to the prediction the metric sees (e.g. normalise normals)."""
        return pred

    def kpi(self, metrics: dict[str, float]) -> float:
        """KPI in [0, 1] for Dynamic Task Prioritization (Guo et al. 2018)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, channels={self.channels})"
