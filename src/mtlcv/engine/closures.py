"""What a balancer may ask for beyond the step's losses: named closures built by the trainer.

The contract is in :mod:`mtlcv.balancing.base` (``needs`` and ``after_step``). This module maps
each name a balancer may list in ``needs`` to a *provider*: a function that turns what the
trainer has at the end of a step (:class:`StepContext`) into the zero-argument callable the
balancer receives, like the ``closure`` that ``torch.optim.LBFGS.step`` takes. The trainer calls
:func:`check_needs` once at construction and :func:`after_step` after every ``optimizer.step()``;
it never learns which method asked, nor why.

The trainer also calls :func:`before_backward` right before ``balancer.backward`` (Auto-λ's
meta-update uses the held-out batch, the step's batch and the optimizer there).

Adding a need: add a field to :class:`StepContext` if the provider needs more than the trainer
already passes (as ``heldout`` and ``optimizer`` were added for Auto-λ), write the provider,
register it in :data:`PROVIDERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..balancing.base import (
    BATCH_LOSSES,
    HELDOUT_LOSSES,
    LOSSES_AFTER_STEP,
    OPTIMIZER,
    LossClosure,
)
from ..errors import ConfigError


@dataclass
class StepContext:
    """What the trainer hands to providers at the end of a step.

    ``losses_of(batch)`` computes the per-task losses ``[T]`` of ``batch`` with the model as it is
    now (the trainer's own loss function: the same forward pass, deep supervision included).
    """

    batch: Mapping[str, Any]
    losses_of: Callable[[Mapping[str, Any]], torch.Tensor]
    #: draws the step's held-out batch (``heldout_losses``); None where the loop has none
    heldout: Callable[[], Mapping[str, Any]] | None = None
    #: the optimizer the step uses (``optimizer``); None where the loop has none
    optimizer: Any = None


def _losses_after_step(ctx: StepContext) -> LossClosure:
    def closure() -> torch.Tensor:
        # the model's mode is left as the step had it (training mode, batch statistics), so that
        # the losses before and after the update are measured alike, as in FAMO's official code
        # (Cranial-XIX/FAMO, experiments/nyuv2/trainer.py: a second forward under no_grad after
        # optimizer.step())
        with torch.no_grad():
            return ctx.losses_of(ctx.batch).detach()

    return closure


def _heldout_losses(ctx: StepContext) -> LossClosure:
    def closure() -> torch.Tensor:
        if ctx.heldout is None:
            raise ConfigError("this training loop provides no held-out batch (heldout_losses)")
        # with gradients: the caller differentiates them (Auto-λ's meta-objective)
        return ctx.losses_of(ctx.heldout())

    return closure


def _batch_losses(ctx: StepContext) -> LossClosure:
    def closure() -> torch.Tensor:
        return ctx.losses_of(ctx.batch)

    return closure


def _optimizer(ctx: StepContext) -> LossClosure:
    def closure() -> Any:
        if ctx.optimizer is None:
            raise ConfigError("this training loop provides no optimizer (optimizer)")
        return ctx.optimizer

    return closure


#: need name -> provider
PROVIDERS: dict[str, Callable[[StepContext], LossClosure]] = {
    LOSSES_AFTER_STEP: _losses_after_step,
    HELDOUT_LOSSES: _heldout_losses,
    BATCH_LOSSES: _batch_losses,
    OPTIMIZER: _optimizer,
}

#: needs not supported with several processes (torchrun) yet: refused at construction
SINGLE_PROCESS = frozenset({HELDOUT_LOSSES, BATCH_LOSSES, OPTIMIZER})


def check_needs(balancer: Any, where: str = "balancer.name") -> None:
    """One-line ConfigError when ``balancer`` needs something no provider supplies."""
    missing = sorted(set(getattr(balancer, "needs", ())) - set(PROVIDERS))
    if missing:
        raise ConfigError(
            f"{where}: {type(balancer).__name__} needs {', '.join(missing)}, which this trainer "
            f"does not provide (it provides {', '.join(sorted(PROVIDERS))})"
        )
    from . import distributed

    single = sorted(set(getattr(balancer, "needs", ())) & SINGLE_PROCESS)
    if single and distributed.active():
        raise ConfigError(
            f"{where}: {type(balancer).__name__} needs {', '.join(single)}, which the trainer "
            f"provides to one process only; run it without torchrun (--nproc-per-node 1)"
        )


def before_backward(balancer: Any, ctx: StepContext) -> None:
    """Call ``balancer.before_backward`` with the closures it needs; nothing if it needs none."""
    needs = getattr(balancer, "needs", ())
    if needs:
        balancer.before_backward({name: PROVIDERS[name](ctx) for name in needs})


def after_step(balancer: Any, ctx: StepContext) -> dict[str, float]:
    """Call ``balancer.after_step`` with the closures it needs; {} (and nothing run) if none."""
    needs = getattr(balancer, "needs", ())
    if not needs:
        return {}
    return balancer.after_step({name: PROVIDERS[name](ctx) for name in needs}) or {}
