"""Mixed precision for every balancer (``train.amp: off | bf16 | fp16``).

``bf16``: the forward pass and the losses run under ``torch.autocast`` in bfloat16; bfloat16
has float32's exponent range, so no loss scaling is needed (as ``torch.amp`` documents).

``fp16``: autocast in float16 and a dynamic loss scale ``s`` (Micikevicius et al., "Mixed
Precision Training", ICLR 2018, Section 3.2; ``torch.amp.GradScaler``'s defaults: start
``2**16``, halve on overflow, double after 2000 clean steps). ``GradScaler`` itself scales one
loss and unscales the optimizer's ``.grad``; a balancer, though, reads *per-task* gradients and
aggregates them, and many aggregations are not homogeneous in their input (Nash-MTL's update is
the same for ``G`` and ``sG``), so they must see unscaled gradients. Here:

* the task losses handed to the balancer carry their true values, but their backward pass multiplies
  the incoming gradient by ``s`` (:class:`_ScaleGrad`), so the float16 backward through the
  network runs at the scaled magnitude (what prevents underflow);
* every model parameter has a gradient hook that divides by ``s``: each gradient of a
  parameter — a per-task row of ``G`` from ``autograd.grad``, or a ``.grad`` accumulated by
  ``backward`` — arrives unscaled, in float32, before any balancer reads it. A balancer's
  aggregation, gradient clipping (Nash-MTL) and ``.grad`` therefore see the numbers of an
  fp32 step. (Representation-space methods aggregate ``dL_t/dz`` scaled by ``s``; their
  aggregations — MGDA-UB's min-norm point, GradDrop's sign mask — are positively homogeneous,
  so their update is ``s`` times the unscaled one and is unscaled by the same hooks on its way
  to the parameters.)
* after ``balancer.backward`` a non-finite gradient means overflow: the optimizer step is
  skipped (for every method alike, the trainer counts it as a skipped step) and ``s`` halves.

The scale and its growth counter are part of ``last.pt`` (``state_dict``), so a resumed fp16
run continues bitwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.scale, None


class Amp:
    """Autocast and (fp16) the dynamic loss scale of one training run."""

    def __init__(self, mode: str, model: nn.Module, device: torch.device, *,
                 init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.mode = mode
        self.device = device
        self.scale = float(init_scale) if mode == "fp16" else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0
        self._hooks = []
        if mode == "fp16":
            for p in model.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_hook(self._unscale))

    def _unscale(self, g: torch.Tensor) -> torch.Tensor:
        return g / self.scale if self.scale != 1.0 else g

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.mode == "off":
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=DTYPES[self.mode]):
            yield

    def scale_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` for the backward pass: same value, gradient scaled by ``s`` (fp16 only).
        Applied to each task's loss before they are stacked, so the balancer still sees one
        graph edge per task (jacobian.py's per-task heads path)."""
        if self.mode != "fp16" or not loss.requires_grad:
            return loss
        return _ScaleGrad.apply(loss, self.scale)

    def step_ok(self, params: list[torch.Tensor]) -> bool:
        """After the balancer's backward: False (and ``s`` halved) when a gradient overflowed;
        the trainer then skips the optimizer step. Always True without fp16."""
        if self.mode != "fp16":
            return True
        grads = [p.grad for p in params if p.grad is not None]
        finite = (bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
                  if grads else True)
        if not finite:
            self.scale *= 0.5
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scale": self.scale, "good_steps": self.good_steps,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:  # a checkpoint from before mixed precision: the defaults
            return
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state.get("skipped", 0))
