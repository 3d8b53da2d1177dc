"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liang, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import (
    LOSSES_AFTER_STEP,
    LossClosure,
    Weighting,
    check_positive,
    clip_shared,
    weight_logs,
)

#: where the losses "after the step" of Algorithm 1 come from
LOSSES_AFTER = ("same_batch", "next_batch")


class FAMO(Weighting):
    """FAMO: decrease all task losses at an equal *log* rate, in O(1) space and time.

    Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, Algorithm 1.
    Task logits ``xi`` (init 0) give ``z = softmax(xi)``; the network follows the gradient of
    ``sum_t z_t log(L_t - L*_t + eps) / c`` with ``c = sum_t z_t / (L_t - L*_t + eps)`` (sec. 3),
    i.e. the loss weights ``w_t = z_t / (c (L_t - L*_t + eps))`` (they sum to 1). After the step the
    logits move with ``delta_t = log(L_t(before) + eps) - log(L_t(after) + eps)``: ``xi`` follows
    ``J_softmax(xi)^T delta`` through Adam with learning rate 0.025 and weight decay ``gamma``,
    which shifts weight to the tasks whose loss decreases slowest. ``L*_t = 0`` (``min_losses``),
    ``eps = 1e-8``.

    Defaults are those of the published NYUv2 runs: ``gamma = 0.001`` (Cranial-XIX/FAMO,
    ``experiments/nyuv2/run.sh`` sets ``gamma=0.001``; LibMTL's ``FAMO_w_gamma`` default is the
    same; 0.01 is only the argument parser's generic default), ``lr = 0.025``
    (``--method-params-lr``), and **no gradient clipping** (``max_norm = 0``): the official
    ``WeightMethod.backward`` in ``methods/weight_methods.py`` calls ``clip_grad_norm_`` *before*
    ``loss.backward()``, on gradients the trainer has just zeroed, so the published runs were not
    clipped. The standalone ``famo.py`` of the same repository clips after backward with
    ``max_norm = 1.0``; ``max_norm: 1.0`` gives that (the shared parameters' gradient norm).

    Losses "after" the step (``losses_after``):

    * ``same_batch`` (default, the paper and the official code): after ``optimizer.step()`` the
      updated model is evaluated again on the *same* batch (no grad, training mode) and the
      logits are updated from the two loss vectors. The balancer asks the trainer for this
      through the step contract (``needs = {"losses_after_step"}``, see
      :mod:`mtlcv.balancing.base`): one extra forward pass per step.
    * ``next_batch``: the losses of the next step (next batch, updated model) stand in for them,
      so the update is one step late and carries the batch-to-batch loss variation (at batch
      size 2 mostly noise), but costs nothing. Kept for loops that cannot call ``after_step``.

    State (in ``state_dict()``): the logits, the Adam moments and step count, the previous losses.
    The logits are buffers, not parameters: FAMO updates them with its own Adam, never the
    trainer's optimizer.
    """

    def __init__(
        self,
        num_tasks: int,
        gamma: float = 0.001,
        lr: float = 0.025,
        max_norm: float = 0.0,
        min_losses: list[float] | None = None,
        losses_after: str = "same_batch",
    ) -> None:
        super().__init__(num_tasks)
        self.gamma = check_positive(gamma, "gamma", allow_zero=True)
        self.lr = check_positive(lr, "lr")
        self.max_norm = check_positive(max_norm, "max_norm", allow_zero=True)
        if losses_after not in LOSSES_AFTER:
            raise ConfigError(
                f"balancer.options.losses_after is {losses_after!r}; expected one of "
                f"{', '.join(LOSSES_AFTER)}"
            )
        self.losses_after = losses_after
        self.needs = frozenset({LOSSES_AFTER_STEP}) if losses_after == "same_batch" else frozenset()
        mins = torch.zeros(num_tasks) if min_losses is None else torch.tensor(min_losses).float()
        self.register_buffer("min_losses", mins.reshape(num_tasks))
        self.register_buffer("logits", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("exp_avg", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_losses", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))

    def z(self) -> torch.Tensor:
        return torch.softmax(self.logits, 0)

    @torch.no_grad()
    def update(self, losses_after: torch.Tensor) -> None:
        """Algorithm 1, lines 7-8: move the logits given the losses after the last step."""
        eps = 1e-8
        before = (self.prev_losses - self.min_losses.double() + eps).log()
        after = (losses_after.double().to(self.prev_losses.device)
                 - self.min_losses.double() + eps).log()
        delta = before - after
        z = self.z()
        grad = z * (delta - (z * delta).sum())  # J_softmax^T delta
        # torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=gamma), by hand so that
        # its state is in state_dict()
        grad = grad + self.gamma * self.logits
        self.adam_steps += 1
        k = int(self.adam_steps)
        self.exp_avg.mul_(0.9).add_(0.1 * grad)
        self.exp_avg_sq.mul_(0.999).add_(0.001 * grad * grad)
        m_hat = self.exp_avg / (1 - 0.9**k)
        v_hat = self.exp_avg_sq / (1 - 0.999**k)
        self.logits.sub_(self.lr * m_hat / (v_hat.sqrt() + 1e-8))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        cur = losses.detach()
        if self.losses_after == "next_batch" and bool(self.has_prev):
            self.update(cur)
        self.prev_losses.copy_(cur.double())
        self.has_prev.fill_(True)
        z = self.z()
        D = cur.double() - self.min_losses.double() + 1e-8
        c = (z / D).sum()
        return (z / (c * D)).to(losses.dtype)

    def after_step(self, closures: Mapping[str, LossClosure]) -> dict[str, float]:
        if self.losses_after == "same_batch" and bool(self.has_prev):
            self.update(closures[LOSSES_AFTER_STEP]())
        return {}

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        w = self.weights(losses)
        (w * losses).sum().backward()
        self.sync_gradients(model)
        if model is not None:
            clip_shared(model, self.max_norm)
        return weight_logs(self.z())


@BALANCERS.register(
    "famo", help="FAMO (Liu et al. 2023), gamma 0.001, logit lr 0.025, same-batch update"
)
def famo(
    num_tasks: int,
    gamma: float = 0.001,
    lr: float = 0.025,
    max_norm: float = 0.0,
    min_losses: list[float] | None = None,
    losses_after: str = "same_batch",
) -> FAMO:
    return FAMO(num_tasks, gamma, lr, max_norm, min_losses, losses_after)
