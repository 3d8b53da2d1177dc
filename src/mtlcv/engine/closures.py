"""What a balancer may ask for beyond the step's losses: named closures built by the trainer.

The contract is in :mod:`mtlcv.balancing.base` (``needs`` and ``after_step``). This module maps
each name a balancer may list in ``needs`` to a *provider*: a function that turns what the
trainer has at the end of a step (:class:`StepContext`) into the zero-argument callable the
balancer receives, like the ``closure`` that ``torch.optim.LBFGS.step`` takes. The trainer calls
:func:`check_needs` once at construction and :func:`after_step` after every ``optimizer.step()``;
it never learns which method asked, nor why.

Adding a need (e.g. the losses of a held-out batch for Auto-λ): add a field to
:class:`StepContext` if the provider needs more than the trainer already passes (a loader of
held-out batches, say), write the provider, register it in :data:`PROVIDERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..balancing.base import LOSSES_AFTER_STEP, LossClosure
from ..errors import ConfigError


@dataclass
class StepContext:
    """What the trainer hands to providers at the end of a step.

    ``losses_of(batch)`` computes the per-task losses ``[T]`` of ``batch`` with the model as it is
    now (the trainer's own loss function: the same forward pass, deep supervision included).
    """

    batch: Mapping[str, Any]
    losses_of: Callable[[Mapping[str, Any]], torch.Tensor]


def _losses_after_step(ctx: StepContext) -> LossClosure:
    def closure() -> torch.Tensor:
        # the model's mode is left as the step had it (training mode, batch statistics), so that
        # the losses before and after the update are measured alike, as in FAMO's official code
        # (Cranial-XIX/FAMO, experiments/nyuv2/trainer.py: a second forward under no_grad after
        # optimizer.step())
        with torch.no_grad():
            return ctx.losses_of(ctx.batch).detach()

    return closure


#: need name -> provider
PROVIDERS: dict[str, Callable[[StepContext], LossClosure]] = {
    LOSSES_AFTER_STEP: _losses_after_step,
}


def check_needs(balancer: Any, where: str = "balancer.name") -> None:
    """One-line ConfigError when ``balancer`` needs something no provider supplies."""
    missing = sorted(set(getattr(balancer, "needs", ())) - set(PROVIDERS))
    if missing:
        raise ConfigError(
            f"{where}: {type(balancer).__name__} needs {', '.join(missing)}, which this trainer "
            f"does not provide (it provides {', '.join(sorted(PROVIDERS))})"
        )


def after_step(balancer: Any, ctx: StepContext) -> dict[str, float]:
    """Call ``balancer.after_step`` with the closures it needs; {} (and nothing run) if none."""
    needs = getattr(balancer, "needs", ())
    if not needs:
        return {}
    return balancer.after_step({name: PROVIDERS[name](ctx) for name in needs}) or {}
