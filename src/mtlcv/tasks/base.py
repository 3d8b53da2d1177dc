"""The task contract.

A :class:`Task` declares everything the rest of the library needs to know about one prediction
problem, so that trainers, architectures and balancers never special-case a task:

* ``name``: the key of its target in a batch and of its prediction in a model's output;
* ``channels``: how many output channels its head produces;
* ``dense``: ``True`` for per-pixel tasks (prediction ``[B, C, H, W]``), ``False`` for
  image-level tasks (prediction ``[B, C]``);
* ``loss(pred, target)``: a scalar tensor, averaged over the valid elements of the batch; a
  batch without any valid element gives an exact 0 that still belongs to the graph (no NaN);
* ``new_metric()``: a fresh streaming accumulator; ``update`` takes the RAW head output
  (it applies :meth:`Task.postprocess` itself); metrics are computed over the whole split,
  never as means of per-batch values, so they do not depend on batch size or order;
* ``higher_is_better``: for every metric name, which way is better (used by Δm and ranks);
* ``primary_metrics``: every metric, in the order tables show them;
* ``check_target(target, image)``: raises :class:`~mtlcv.errors.DataError` naming the task and
  both shapes when a dataset returns a target of the wrong shape, dtype or values;
* ``postprocess(pred)``: raw head output -> the prediction the metric scores (for export);
* ``kpi(metrics)``: a key performance indicator in [0, 1] (higher is better), used by Dynamic
  Task Prioritization (Guo et al., ECCV 2018);
* ``published_aggregation``: ``"split"`` or ``"batch_mean"``, how the papers' published protocol
  aggregates the metrics (``eval.protocol: published``, see :mod:`mtlcv.engine.protocol`).

Batch contract (docs/design.md): ``image`` float ``[B,3,H,W]``; ``semseg`` long ``[B,H,W]`` with
255 = ignore; ``depth`` float ``[B,1,H,W]`` with 0 = missing; ``normals`` float ``[B,3,H,W]``
unit vectors in the camera frame (x right, y down, z forward) with 0 = missing; ``edges`` float
``[B,1,H,W]`` in {0, 1} with 255 = ignore; ``classification`` long ``[B]`` with 255 = ignore;
``detection`` float ``[B,M,5]``, rows ``(x1, y1, x2, y2, class)`` in pixels of the image, rows
of class −1 padding (``M`` = the largest box count of the batch, 0 when no image has one).
Predictions are raw head outputs at the target's resolution (detection: ``[B, C+5, H, W]`` at
the image's).

A target that is not a fixed-size tensor is still one entry of the batch dict: a dataset
returns per sample an object that batches itself and moves with the image (detection:
:class:`~mtlcv.tasks.detection.Boxes`, with ``collate``, ``hflip`` and ``crop_resize``), so the
loaders (:func:`mtlcv.data.base.collate`), the augmentation (:mod:`mtlcv.data.transforms`), the
trainer and the architectures never learn about it. ``postprocess`` may then return a
structured prediction (detection: per image a dict of ``boxes``, ``scores``, ``labels``).
An auxiliary task (``auxiliary = True``, from the config's ``aux_tasks``) is trained and
balanced like any other and left out of model selection and Δm.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from ..errors import DataError


class Metric(ABC):
    """A streaming metric: ``update`` on every batch, ``compute`` once at the end of the split.

    Its state is what ``update`` accumulates. When several processes each score a shard of the
    split (``engine/distributed.py``), their states are merged exactly before ``compute``: by
    default every tensor attribute is a sum (confusion matrix, counts, float64 sums) and every
    list attribute a concatenation (the normals' angles for the exact median). A metric whose
    state is anything else overrides :meth:`state` and :meth:`merge`.
    """

    @abstractmethod
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]:
        """The accumulated state (picklable): tensor and list attributes."""
        return {k: v for k, v in vars(self).items() if isinstance(v, (torch.Tensor, list))}

    def merge(self, state: dict[str, Any]) -> None:
        """Add another shard's :meth:`state` to this one (sums add, lists concatenate)."""
        for k, v in state.items():
            mine = getattr(self, k)
            if isinstance(mine, torch.Tensor):
                setattr(self, k, mine + v.to(mine.device))
            else:
                mine.extend(v)


class Task(ABC):
    name: str
    channels: int
    dense: bool = True
    #: metric name -> True when a higher value is better
    higher_is_better: dict[str, bool]
    #: every metric, in the order tables show them
    primary_metrics: tuple[str, ...] = ()
    #: the metric (a percentage, higher is better) that :meth:`kpi` maps to [0, 1]
    kpi_metric: str = ""
    #: channels of the target (``None``: the target has no channel axis, e.g. labels)
    target_channels: int | None = 1
    #: True when the target holds integer labels, False when it holds floats
    integer_target: bool = False
    #: how the published protocol (``eval.protocol: published``, :mod:`mtlcv.engine.protocol`)
    #: aggregates this task's metrics: ``"split"`` (one computation over the whole split, as
    #: here) or ``"batch_mean"`` (the mean over evaluation batches of per-batch values, as the
    #: SegNet-MTAN papers' code does for depth and normals)
    published_aggregation: str = "split"
    #: an auxiliary task (config ``aux_tasks``): trained and balanced, never selected on
    auxiliary: bool = False

    @abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def loss_count(
        self, target: torch.Tensor, pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        """How many elements :meth:`loss` averages over for ``target`` (its denominator).

        Several processes each holding part of a batch combine their losses into the loss of the
        whole batch as ``sum_r n_r L_r / sum_r n_r`` with these counts (engine/distributed.py).
        Default: the batch size; tasks with missing values count the valid elements. ``pred``
        is the prediction the loss was computed from (the trainer passes it), for a task whose
        denominator depends on it (detection counts its positive locations at the
        prediction's resolution).
        """
        return torch.tensor(float(target.shape[0]))

    @abstractmethod
    def new_metric(self) -> Metric: ...

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Map the raw head output to the prediction the metric sees (e.g. normalise normals)."""
        return pred

    def expected_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Target shape for a batched image of shape ``[B, 3, H, W]``."""
        b, _, h, w = image_shape
        if not self.dense:
            return (b,)
        return (b, h, w) if self.target_channels is None else (b, self.target_channels, h, w)

    def check_target(self, target: torch.Tensor, image: torch.Tensor) -> None:
        """Raise DataError (one line naming the task and both shapes) for a malformed target."""
        img = tuple(image.shape)
        where = f"task {self.name!r}"
        if image.dim() != 4:
            raise DataError(f"{where}: image shape {img} is not the expected [B, 3, H, W]")
        shape, want = tuple(target.shape), self.expected_shape(img)
        if shape != want:
            raise DataError(
                f"{where}: target shape {shape} does not match the expected {want} for image {img}"
            )
        is_int = not (target.dtype.is_floating_point or target.dtype.is_complex)
        is_int = is_int and target.dtype != torch.bool
        if self.integer_target and not is_int:
            raise DataError(
                f"{where}: target dtype {target.dtype} is not an integer type "
                f"(expected long labels) for image {img}"
            )
        if not self.integer_target and not target.dtype.is_floating_point:
            raise DataError(
                f"{where}: target dtype {target.dtype} is not a floating type for image {img}"
            )
        self.check_values(target)

    def check_values(self, target: torch.Tensor) -> None:
        """Hook for value checks (label range, {0, 1, 255}); raise DataError naming the value."""
        return None

    def kpi(self, metrics: dict[str, float]) -> float:
        """KPI in [0, 1] for Dynamic Task Prioritization (Guo et al., ECCV 2018, Sec. 3.2).

        DTP needs a higher-is-better measure bounded by [0, 1]; every task picks one of its
        percentage metrics (``kpi_metric``) and divides it by 100. Missing/NaN values give 0
        (the lowest KPI, i.e. the highest priority), so a task never scored is not neglected.
        """
        value = metrics.get(self.kpi_metric, math.nan) / 100.0
        return 0.0 if math.isnan(value) else min(1.0, max(0.0, value))

    def check_pred(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Raise DataError when a prediction does not match its target's batch/spatial size."""
        want = (target.shape[0], self.channels)
        if self.dense:
            want += tuple(target.shape[-2:])
        if tuple(pred.shape) != want:
            raise DataError(
                f"task {self.name!r}: prediction shape {tuple(pred.shape)} does not match the "
                f"expected {want} for target {tuple(target.shape)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, channels={self.channels})"


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; exactly 0 (still in the graph) when the mask is empty.

    Multiplying by the mask instead of indexing avoids a host sync, and a masked element
    contributes neither to the value nor to the gradient (its values must be finite).
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def ratio(num: float, den: float, scale: float = 100.0) -> float:
    """``scale * num / den``; NaN when nothing was counted (an empty split has no score)."""
    return scale * num / den if den > 0 else math.nan
