"""Auto-λ: task weights learned by a one-step lookahead (Liu, James, Davison & Johns, TMLR 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import (
    BATCH_LOSSES,
    HELDOUT_LOSSES,
    OPTIMIZER,
    LossClosure,
    Weighting,
    check_positive,
    weight_logs,
)

#: how the meta-gradient's second-order term is computed
META_GRADS = ("finite_difference", "exact")


class AutoLambda(Weighting):
    """Auto-λ: learn the task weights ``λ`` so that one training step lowers the primary tasks'
    loss on held-out data.

    Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR
    2022, the bi-level problem of sec. 3 solved with one lookahead step, as in DARTS (Liu,
    Simonyan & Yang, ICLR 2019, eq. 6-8)::

        θ'   = θ - α ∇_θ Σ_i λ_i L_i(x_train; θ)                     (virtual step)
        λ   <- λ - β ∇_λ Σ_{i ∈ primary} L_i(x_val; θ')              (meta step)
        ∇_λ_i L_val(θ') = -α ⟨∇_θ L_i(x_train; θ), d⟩,  d = ∇_θ' L_val(θ')

    ``λ`` enters the training loss linearly, so the "Hessian" term of DARTS is here the
    directional derivative of each task's training loss along ``d``; the official code
    (lorenmt/auto-lambda, ``auto_lambda.py: compute_hessian``) takes it by central finite
    differences, ``(L_i(θ + εd) - L_i(θ - εd)) / 2ε`` with ``ε = 0.01 / ||d||`` (two forward
    passes, no per-task backward), which is our default (``meta_grad: finite_difference``);
    ``meta_grad: exact`` computes ``⟨∇_θ L_i, d⟩`` with one backward pass per task (tests check
    that the two agree). The network is then trained on ``Σ_i λ_i L_i`` with the updated ``λ``.

    Published defaults (official code, ``trainer_dense.py`` / ``trainer_cifar.py``): ``λ``
    initialised to 0.1 for every task (``--autol_init``), updated by Adam (betas 0.9/0.999,
    eps 1e-8, no weight decay) at ``lr = 1e-4`` (``--autol_lr``, the dense-prediction default;
    3e-4 in ``trainer_cifar.py``, 3e-5 for CityScapes per the README), **every step**, with
    ``α`` the network optimizer's current learning rate. Primary tasks: ``"all"`` (the
    multi-task setting, ``--task all``) or a list of task indices (auxiliary learning: the
    others are trained but only the primaries are in the meta-objective). ``λ`` is not
    constrained (neither positive nor normalised), as in the code.

    Where the official code departs from the paper, and what we do:

    * the "validation" batch is **not** a held-out split: the official trainers build a second
      ``DataLoader`` over the *training set* ("a copy of train_loader with different data
      order"), one batch per step. We do the same: the trainer's ``heldout_losses`` closure
      draws batch ``k`` of a second shuffle of the training split (mtlcv.balancing.base);
    * the virtual step is SGD *with* the optimizer's momentum and weight decay,
      ``θ' = θ - α(μ m + g + wd θ)`` (``virtual_step``), not the paper's plain gradient step; we
      follow the code, with each parameter's own group's ``lr``/``momentum``/``weight_decay``
      (the code uses group 0's for all; identical with one group). With an optimizer without
      momentum buffers (Adam) the virtual step is the SGD step ``θ - α(g + wd θ)``, as in the
      code;
    * the meta step comes *before* the network's update on the same training batch (the code's
      order), using the step's own graph for ``g`` (the code recomputes the forward pass);
    * the code's ``θ ± εd`` passes run the real model in training mode and so move its
      BatchNorm running statistics twice per step, and it restores ``θ`` by ``+εd - 2εd + εd``
      in floating point; we restore parameters *and buffers* exactly (the meta step leaves the
      model as it found it).

    Without the step contract (a bare ``backward``, no ``before_backward``), the update is the
    weighted sum with the current ``λ`` and ``λ`` does not move; the trainer always provides
    the closures. Single-process only (the trainer refuses it under torchrun in one line).

    A step whose meta-gradient is not finite (e.g. a non-finite held-out loss) keeps ``λ`` and
    logs ``meta_skipped``.

    State (``state_dict()``): ``λ`` and the meta optimizer's Adam moments and step count.

    Args:
        num_tasks: T.
        init: initial weight of every task.
        lr: the meta optimizer's (Adam's) learning rate β.
        primary: ``"all"`` or the indices of the primary tasks.
        meta_grad: ``"finite_difference"`` (official) or ``"exact"``.
        fd_step: the norm of the finite-difference perturbation (official: 0.01).
    """

    def __init__(
        self,
        num_tasks: int,
        init: float = 0.1,
        lr: float = 1e-4,
        primary: str | Sequence[int] = "all",
        meta_grad: str = "finite_difference",
        fd_step: float = 0.01,
    ) -> None:
        super().__init__(num_tasks)
        try:
            init = float(init)
        except (TypeError, ValueError):
            raise ConfigError(f"balancer.options.init must be a number, got {init!r}") from None
        self.lr = check_positive(lr, "lr")
        self.fd_step = check_positive(fd_step, "fd_step")
        if meta_grad not in META_GRADS:
            raise ConfigError(
                f"balancer.options.meta_grad is {meta_grad!r}; expected one of "
                f"{', '.join(META_GRADS)}"
            )
        self.meta_grad = meta_grad
        mask = torch.zeros(num_tasks)
        if primary == "all":
            mask.fill_(1.0)
        else:
            ok = isinstance(primary, (list, tuple)) and len(primary) > 0 and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_tasks
                for i in primary
            )
            if not ok:
                raise ConfigError(
                    f"balancer.options.primary must be 'all' or a non-empty list of task "
                    f"indices in 0..{num_tasks - 1}, got {primary!r}"
                )
            mask[list(primary)] = 1.0
        self.primary = primary
        self.needs = frozenset({HELDOUT_LOSSES, BATCH_LOSSES, OPTIMIZER})
        self.register_buffer("primary_mask", mask, persistent=False)
        self.register_buffer("meta_weights", torch.full((num_tasks,), init))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self._closures: Mapping[str, LossClosure] | None = None

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.meta_weights.to(device=losses.device, dtype=losses.dtype)

    # ------------------------------------------------------------------ step contract
    def before_backward(self, closures: Mapping[str, LossClosure]) -> None:
        self._closures = closures

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        closures, self._closures = self._closures, None
        logs: dict[str, float] = {}
        if closures is not None and model is not None:
            grad = self.meta_gradient(losses, model, closures)
            if bool(torch.isfinite(grad).all()):
                self.meta_update(grad)
            else:  # e.g. a non-finite held-out loss: λ keeps its value rather than turn NaN
                logs["meta_skipped"] = 1.0
        w = self.weights(losses)
        (w * losses).sum().backward()
        self.sync_gradients(model)
        return {**weight_logs(w), **logs}

    # ------------------------------------------------------------------ the meta step
    def meta_gradient(
        self, losses: torch.Tensor, model: nn.Module, closures: Mapping[str, LossClosure]
    ) -> torch.Tensor:
        """``∇_λ Σ_{primary} L_i(x_val; θ')`` ``[T]`` (see the class doc). ``losses`` are the
        step's losses with their graph (kept for the network's backward); the model's parameters
        and buffers are as they were when this returns."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer: Any = closures[OPTIMIZER]()
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        lam = self.meta_weights.detach().to(device=losses.device, dtype=losses.dtype)
        grads = list(torch.autograd.grad((lam * losses).sum(), params, retain_graph=True,
                                         allow_unused=True))
        originals = [p.data for p in params]
        # the meta passes run on copies of the buffers (BatchNorm's running statistics), which
        # the step's graph may have saved: the originals are neither changed nor version-bumped
        buffers = list(model.buffers())
        saved = [b.data for b in buffers]
        for b in buffers:
            b.data = b.data.clone()
        alphas: list[float] = []
        try:
            # θ' by replacing each parameter's data: the step's graph keeps the originals
            for k, p in enumerate(params):
                alpha, step = virtual_step(p, grads[k], groups.get(id(p)),
                                           optimizer.state.get(p, {}))
                grads[k] = None  # memory: the gradient is not needed once θ' is formed
                alphas.append(alpha)
                p.data = p.data - alpha * step
                del step
            val = closures[HELDOUT_LOSSES]()
            objective = (val * self.primary_mask.to(val)).sum()
            d = torch.autograd.grad(objective, params, allow_unused=True)
            # v = A d (A = each parameter's learning rate): ∇_λ_i = -⟨∇_θ L_i, v⟩
            v = [torch.zeros_like(p) if di is None else di.detach().mul_(a)
                 for p, di, a in zip(params, d, alphas)]
            del d
            for p, o in zip(params, originals):
                p.data = o
            if self.meta_grad == "exact":
                out = torch.zeros(self.num_tasks, dtype=torch.float64)
                for i in range(self.num_tasks):
                    gi = torch.autograd.grad(losses[i], params, retain_graph=True,
                                             allow_unused=True)
                    out[i] = -sum(float((g * vi).sum()) for g, vi in zip(gi, v) if g is not None)
                return out.to(self.meta_weights)
            norm = float(torch.sqrt(sum((vi.double() ** 2).sum() for vi in v)))
            if norm != norm or norm == float("inf"):  # non-finite: the caller skips the update
                return torch.full_like(self.meta_weights, float("nan"))
            if norm == 0.0:  # no primary gradient reaches the parameters: nothing to learn
                return torch.zeros_like(self.meta_weights)
            eps = self.fd_step / norm
            with torch.no_grad():
                for p, o, vi in zip(params, originals, v):
                    p.data = o + eps * vi
                plus = closures[BATCH_LOSSES]().detach()
                for p, o, vi in zip(params, originals, v):
                    p.data = o - eps * vi
                minus = closures[BATCH_LOSSES]().detach()
            return (-(plus - minus) / (2 * eps)).to(self.meta_weights)
        finally:
            for p, o in zip(params, originals):
                p.data = o
            for b, o in zip(buffers, saved):
                b.data = o

    @torch.no_grad()
    def meta_update(self, grad: torch.Tensor) -> None:
        """One step of ``torch.optim.Adam([λ], lr)`` (betas 0.9/0.999, eps 1e-8), by hand so
        that its state is in ``state_dict()``."""
        grad = grad.to(self.meta_weights)
        self.adam_steps += 1
        k = int(self.adam_steps)
        self.exp_avg.mul_(0.9).add_(grad, alpha=0.1)
        self.exp_avg_sq.mul_(0.999).addcmul_(grad, grad, value=0.001)
        denom = (self.exp_avg_sq.sqrt() / (1 - 0.999**k) ** 0.5).add_(1e-8)
        self.meta_weights.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - 0.9**k))


def virtual_step(
    p: torch.Tensor, grad: torch.Tensor | None, group: Mapping[str, Any] | None,
    state: Mapping[str, Any],
) -> tuple[float, torch.Tensor]:
    """``(α, s)`` with ``θ' = θ - α s`` the optimizer's next step as the official code models it:
    ``s = μ m + g + wd θ`` (SGD's momentum buffer ``m`` when there is one; ``g`` the gradient of
    the weighted training loss). A parameter outside the optimizer does not move (α = 0)."""
    g = torch.zeros_like(p) if grad is None else grad.detach()
    if group is None:
        return 0.0, g
    step = g + float(group.get("weight_decay", 0.0) or 0.0) * p.detach()
    buf = state.get("momentum_buffer")
    mom = float(group.get("momentum", 0.0) or 0.0)
    if buf is not None and mom:
        step = step + mom * buf
    return float(group["lr"]), step


@BALANCERS.register(
    "autol", help="Auto-λ (Liu et al. 2022), one-step lookahead, init 0.1, Adam lr 1e-4"
)
def autol(
    num_tasks: int,
    init: float = 0.1,
    lr: float = 1e-4,
    primary: str | list[int] = "all",
    meta_grad: str = "finite_difference",
    fd_step: float = 0.01,
) -> AutoLambda:
    return AutoLambda(num_tasks, init, lr, primary, meta_grad, fd_step)
