"""The balancer contract.

A balancer turns the per-task losses of one training step into gradients: after
``balancer.backward(losses, model)`` every parameter's ``.grad`` holds the update direction and
the trainer only calls ``optimizer.step()``. The trainer never asks which method it runs.

Two families (docs/design.md, after torchjd and LibMTL):

* **loss weighting** (:class:`Weighting`): ``weights(losses)`` returns a weight per task from the
  losses and their history; the update is the gradient of ``sum_k w_k L_k``;
* **gradient aggregation** (:class:`GradientBalancer`): the per-task gradients are stacked into
  a matrix ``G`` (tasks x parameters, see :mod:`mtlcv.balancing.jacobian`) and ``aggregate(G)``
  maps it to one update vector. As in torchjd, most aggregators are a *weighting of the Gramian*
  ``G G^T`` (``gramian_weights``) followed by ``w @ G``; every aggregator also works on a bare
  matrix, without a model, and keeps the last task weights in ``last_weights``.

Stateful methods keep their state in ``state_dict()`` (buffers, parameters and
``get_extra_state``), which checkpoints save and ``--resume`` restores. Learnable balancer
parameters (e.g. uncertainty weighting's log-variances) are returned by ``parameters()`` and
optimised by the trainer's optimizer in their own parameter group: never weight-decayed, and at
the learning rate ``param_lr`` when the balancer sets one (else the model's).

Needs beyond the losses (the step contract, like ``torch.optim.LBFGS.step(closure)``). A
balancer that needs more than the losses of the step lists it by name in ``needs``. The trainer
then calls ``balancer.after_step(closures)`` right after ``optimizer.step()``, with one
zero-argument callable per name; the balancer decides whether to call it. The trainer only maps
names to callables (:mod:`mtlcv.engine.closures`), never asks which method it runs, and refuses
(one line, at construction) a balancer that needs a name it cannot provide. Names provided:

* ``"losses_after_step"`` (:data:`LOSSES_AFTER_STEP`): the per-task losses ``[T]`` of the batch
  just trained on, recomputed by the updated model under ``torch.no_grad()`` and in the model's
  training mode, exactly as the step's own losses were computed (FAMO's "loss after the
  update", Liu et al. 2023, Algorithm 1). It costs one forward pass, and only when called.

* ``"heldout_losses"`` (:data:`HELDOUT_LOSSES`): the per-task losses ``[T]`` of a *held-out*
  batch, one the step does not train on, computed **with gradients** by the model as it is when
  the closure is called (training mode). The trainer draws it from the training split in a
  second, independently shuffled order (seed ``seed + 1_000_003 + epoch``, batch ``k`` of that
  order at step ``k``, so a resumed run draws the same batches), which is what Auto-λ's
  official code uses as its "validation" data. One forward pass per call.
* ``"batch_losses"`` (:data:`BATCH_LOSSES`): the per-task losses ``[T]`` of the step's own batch,
  recomputed (with gradients unless the caller disables them) by the model as it is when the
  closure is called. One forward pass per call.
* ``"optimizer"`` (:data:`OPTIMIZER`): the trainer's ``torch.optim.Optimizer`` itself (its
  param groups' ``lr``/``momentum``/``weight_decay`` and its state, e.g. SGD's momentum
  buffers), for a balancer that simulates the optimizer's next step. Read it; never step it.

When the closures are handed over: ``losses_after_step`` only makes sense after the step, in
``after_step``; the others are also handed over *before* the step, by
``before_backward(closures)``, which the trainer calls right before ``backward`` (same mapping,
one callable per name in ``needs``); a balancer that uses them there keeps the mapping for its
``backward`` (Auto-λ's meta-update comes before the network's update, as in its official
code). A loop that does not run the step contract (a bare ``backward``) gets no closures; each
balancer with needs documents what it does then (FAMO: no logit update; Auto-λ: no meta-update).
The needs ``heldout_losses``, ``batch_losses`` and ``optimizer`` are single-process for now: under
torchrun the trainer refuses them in one line at construction.

Extending to another need: a new name here, one provider in ``mtlcv.engine.closures`` (and a
field of its ``StepContext`` if the provider needs more than the trainer passes), and a
balancer that lists it in ``needs``. The callable carries everything it needs; the hooks'
signatures do not change. Nothing else in the trainer changes.

Construction: ``mtlcv.balancing.create(name, num_tasks=T, **options)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .jacobian import TaskGradients

#: ``needs`` name: the per-task losses of the same batch after ``optimizer.step()`` (no grad)
LOSSES_AFTER_STEP = "losses_after_step"

#: ``needs`` name: the per-task losses of a held-out batch, with gradients (Auto-λ)
HELDOUT_LOSSES = "heldout_losses"
#: ``needs`` name: the per-task losses of the step's batch at the current parameters
BATCH_LOSSES = "batch_losses"
#: ``needs`` name: the trainer's optimizer (read only)
OPTIMIZER = "optimizer"

#: a closure the trainer passes to ``after_step``: no arguments, per-task losses ``[T]``
#: (``optimizer``'s returns the optimizer)
LossClosure = Callable[[], torch.Tensor]


class Balancer(nn.Module):
    """Base class: sees the per-task losses and leaves ``.grad`` set for the optimizer."""

    #: "weighting" or "aggregation"
    family: str = "weighting"
    #: what the balancer needs from the trainer beyond the step's losses (see the module doc);
    #: a class default, which an instance may replace according to its options
    needs: frozenset[str] = frozenset()
    #: learning rate of the balancer's own learnable parameters (None: ``optim.lr``)
    param_lr: float | None = None

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        """Set ``.grad`` from the loss vector ``losses`` (shape ``[T]``); return values to log
        (floats, or 0-d tensors, which the trainer sums on the device and reads once per epoch:
        a ``float()`` here would make every step wait for the GPU)."""
        raise NotImplementedError

    def after_step(self, closures: Mapping[str, LossClosure]) -> dict[str, float]:
        """Called after ``optimizer.step()`` with one callable per name in ``needs`` (the module
        doc lists them); returns values to log. Not called when ``needs`` is empty."""
        return {}

    def before_backward(self, closures: Mapping[str, LossClosure]) -> None:
        """Called right before ``backward`` with one callable per name in ``needs`` (the module
        doc says which are meaningful then). Not called when ``needs`` is empty."""

    def on_epoch_end(
        self,
        epoch: int,
        train_losses: Sequence[float],
        kpis: Sequence[float] | None = None,
    ) -> None:
        """Hook called once per epoch with the mean training loss and the val KPI of each task."""

    @staticmethod
    def sync_gradients(model: nn.Module | None) -> None:
        """With several processes (torchrun): average ``model``'s gradients over them, after a
        backward pass of losses whose values are global (as the trainer provides). No-op for
        a single process. Every ``backward`` that computes gradients locally calls it before
        anything that reads them (e.g. gradient clipping)."""
        if model is None:
            return
        from ..engine import distributed

        if distributed.active():
            distributed.sync_gradients(model.parameters(), "mean")


class Weighting(Balancer):
    """Loss weighting: the update is the gradient of ``sum_k w_k L_k``."""

    family = "weighting"

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        w = self.weights(losses)
        total = (w * losses).sum()
        total.backward()
        self.sync_gradients(model)
        return weight_logs(w)


def weight_logs(w: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"w0": ..., "w1": ...}``: the task weights for the training log, as 0-d tensors on the
    weights' device (``float()`` reads one): the trainer sums them over the epoch on the device
    and reads them once, so logging never makes the step wait for the device."""
    if w is None:
        return {}
    return {f"w{k}": v for k, v in enumerate(w.detach().flatten().unbind())}


class GradientBalancer(Balancer):
    """Gradient aggregation: per-task gradients ``G`` (T x P) -> one update vector (P).

    Subclasses implement ``gramian_weights(M)`` (weights from the Gramian ``M = G G^T``, the update
    being ``w @ G``) or override ``aggregate(G, losses)`` altogether. ``backward`` computes ``G``
    with :func:`mtlcv.balancing.jacobian.task_gradients` in ``self.mode`` and writes the update
    into the shared parameters' ``.grad``; head parameters get their own task's gradient, scaled
    by ``last_weights`` when ``scale_task_params`` is True. A method that overrides neither
    ``aggregate`` nor ``aggregate_gradients`` only needs ``M``: on hard-sharing models in
    ``"param"`` mode ``backward`` then never forms ``G`` (see jacobian.py, "Memory"); the update
    is the same ``w @ G``.

    Args:
        num_tasks: T.
        mode: ``"param"`` (per-task gradients of the shared parameters, exact) or ``"rep"``
            (of the shared representation, the MGDA-UB shortcut); default: the method's own.
        batched: compute the Jacobian with one batched (vmapped) backward pass instead of T.
    """

    family = "aggregation"
    #: the gradient space the method is defined in (see jacobian.py)
    default_mode: str = "param"
    #: heads get ``w_t * grad L_t`` (True) or ``grad L_t`` (False)
    scale_task_params: bool = False

    def __init__(self, num_tasks: int, mode: str | None = None, batched: bool = True) -> None:
        super().__init__(num_tasks)
        from .jacobian import check_mode

        self.mode = check_mode(mode or self.default_mode)
        self.batched = bool(batched)
        #: task weights of the last call (None for methods without weights)
        self.last_weights: torch.Tensor | None = None
        # set once a batched Jacobian has worked, so later steps may free the graph at once
        self._batched_ok = False

    # ------------------------------------------------------------------ matrix -> vector
    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """Task weights ``[T]`` from the Gramian ``M = G G^T`` ``[T, T]`` (float64)."""
        raise NotImplementedError

    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """The update ``[P]`` for the per-task gradients ``G`` ``[T, P]``.

        ``losses`` (``[T]``, detached) is needed only by methods that use loss values (MGDA's
        ``loss`` normalisations); it may be omitted otherwise.
        """
        G = _check_matrix(G, self.num_tasks)
        M = (G @ G.T).double()
        w = self.gramian_weights(M, losses)
        self.last_weights = w.to(device=G.device, dtype=G.dtype)
        return self.last_weights @ G

    # ------------------------------------------------------------------ model
    def loss_scale(self, losses: torch.Tensor) -> torch.Tensor | None:
        """Per-task factors ``c_t`` of the gradients: ``G``'s rows and the heads' gradients are
        ``c_t grad L_t``, the gradients of a transformed loss ``f_t(L_t)`` with ``c_t = f_t'(L_t)``
        (DB-MTL's ``log``: ``1/L_t``; IMTL's ``exp(s_t) L_t``: ``exp(s_t)``). None: all 1."""
        return None

    def aggregate_gradients(self, tg: TaskGradients, losses: torch.Tensor) -> torch.Tensor:
        """``aggregate`` on the step's gradients (GradDrop also needs the representation)."""
        return self.aggregate(tg.matrix, losses)

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        from .jacobian import task_gradients

        if model is None:
            raise TypeError(f"{type(self).__name__}.backward needs the model")
        from ..engine import distributed

        scale = self.loss_scale(losses)
        info: dict = {}
        # a method that only weighs the Gramian never needs G itself (see jacobian.py); with
        # several processes G is needed: its all-reduce gives the global per-task gradients
        cls = type(self)
        gramian_only = (cls.aggregate is GradientBalancer.aggregate
                        and cls.aggregate_gradients is GradientBalancer.aggregate_gradients
                        and not distributed.active())
        tg = task_gradients(
            losses, model, self.mode, scale=scale, batched=self.batched,
            safe=not self._batched_ok, info=info, gramian=gramian_only,
        )
        self._batched_ok = self._batched_ok or bool(info.get("batched"))
        tg.globalise()
        if tg.matrix is None:
            assert tg.gramian is not None
            w = self.gramian_weights(tg.gramian, losses.detach())
            self.last_weights = w.to(device=losses.device, dtype=losses.dtype)
            tg.apply_weights(self.last_weights, self._task_coeffs(losses))
        else:
            update = self.aggregate_gradients(tg, losses.detach())
            tg.apply(update, self._task_coeffs(update))
        tg.synchronise(model)
        self.after_backward(model)
        return weight_logs(self.last_weights)

    def _task_coeffs(self, like: torch.Tensor) -> torch.Tensor:
        if self.scale_task_params and self.last_weights is not None:
            return self.last_weights
        return torch.ones(self.num_tasks, device=like.device, dtype=like.dtype)

    def after_backward(self, model: nn.Module) -> None:
        """Hook run once ``.grad`` is set (Nash-MTL clips the shared gradient norm here)."""


def _check_matrix(G: torch.Tensor, T: int) -> torch.Tensor:
    if G.dim() != 2 or G.shape[0] != T:
        raise ValueError(f"expected a gradient matrix of shape [{T}, P], got {list(G.shape)}")
    return G


def clip_shared(model: nn.Module, max_norm: float) -> None:
    """Clip the total gradient norm of ``model``'s shared parameters (Nash-MTL's, FAMO's code)."""
    if max_norm > 0:
        from .jacobian import split_parameters

        shared = [p for p in split_parameters(model)[0] if p.grad is not None]
        if shared:
            torch.nn.utils.clip_grad_norm_(shared, max_norm)


def check_positive(value: float, key: str, allow_zero: bool = False) -> float:
    """``value`` as a float, or a ConfigError naming ``balancer.options.<key>``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"balancer.options.{key} must be a number, got {value!r}") from None
    if v < 0 or (v == 0 and not allow_zero) or v != v:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"balancer.options.{key} must be {bound}, got {value!r}")
    return v
