"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting, check_positive, weight_logs
from .jacobian import is_separable, jacobian, split_parameters, task_gradients


class GradNorm(Weighting):
    """GradNorm: learn loss weights so that each task's gradient norm follows its training rate.

    Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks", ICML 2018, Algorithm 1. With ``W`` the weights of the last shared layer:

    * ``G_W^(i) = ||grad_W w_i L_i||`` and ``Gbar_W`` their mean;
    * inverse training rates ``r_i = Ltilde_i / mean_j Ltilde_j`` with ``Ltilde_i = L_i(t)/L_i(0)``
      (``L_i(0)`` is the loss of the first step);
    * ``L_grad = sum_i |G_W^(i) - Gbar_W r_i^alpha|`` (eq. 2), the target treated as a constant;
    * the network is updated with ``sum_i w_i L_i``, the weights with ``grad_w L_grad``, and the
      weights are renormalised to ``sum_i w_i = T`` after every update.

    ``grad_w L_grad`` is computed in closed form: ``dL_grad/dw_i = sign(G_i - target_i) ||grad_W
    L_i||``, so GradNorm needs the per-task gradients of one layer only, and no double backward.
    On a model with a shared representation ``z`` (hard sharing) each head is run backwards once
    (``dL_i/dz``, see jacobian.py), then only the layers between ``W`` and ``z`` once per task,
    and the update is ``z``'s VJP with ``sum_i w_i dL_i/dz``: about the cost of a plain step.
    Otherwise one batched backward through the heads and that layer. The weights
    ``w`` are an ``nn.Parameter`` (initialised to 1) optimised by the trainer's optimizer with the
    model; they are renormalised at the start of the next step (equivalent for the update) and
    floored at 1e-6 so a large step cannot make a weight negative.

    Args:
        alpha: asymmetry. The paper uses alpha = 1.5 for NYUv2 (its dense-prediction benchmark,
            also LibMTL's default), our setting, hence the default here; 0.12 for its regression
            toy and larger values when tasks are more asymmetric.
        layer: name (as in ``model.named_parameters()``) of the last shared layer's weight;
            default: the last shared parameter with at least 2 dimensions in registration order
            (the backbone's last convolution/linear weight). A model without shared layers
            (single-task, soft sharing) keeps the weights fixed, with a warning.
    """

    def __init__(self, num_tasks: int, alpha: float = 1.5, layer: str | None = None) -> None:
        super().__init__(num_tasks)
        self.alpha = check_positive(alpha, "alpha", allow_zero=True)
        self.layer = layer
        self.w = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self._warned = False

    def last_shared_weight(self, model: nn.Module) -> nn.Parameter | None:
        shared = split_parameters(model)[0]
        if self.layer is not None:
            named = dict(model.named_parameters())
            if self.layer not in named:
                raise ConfigError(
                    f"balancer.options.layer {self.layer!r} is not a parameter of the model"
                )
            return named[self.layer]
        cands = [p for p in shared if p.dim() >= 2]
        return cands[-1] if cands else None

    @torch.no_grad()
    def _renormalise(self) -> None:
        self.w.clamp_(min=1e-6)
        self.w.mul_(self.num_tasks / self.w.sum())

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.w.detach().to(losses.dtype)

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        if model is None:
            raise TypeError("GradNorm.backward needs the model")
        self._renormalise()
        w = self.weights(losses)
        if not bool(self.started):
            self.initial_losses.copy_(losses.detach())
            self.started.fill_(True)
        W = self.last_shared_weight(model)
        if W is None:  # single-task / soft-sharing models: nothing to balance at a shared layer
            if not self._warned:
                warnings.warn("GradNorm: the model has no shared layer; the weights stay fixed",
                              RuntimeWarning, stacklevel=2)
                self._warned = True
            (w * losses).sum().backward()
            self.sync_gradients(model)
            return weight_logs(w)
        from ..engine import distributed

        shared = split_parameters(model)[0]
        if any(p is W for p in shared) and is_separable(losses, model):
            # heads once each (dL_i/dz), then only the layers between W and z once per task;
            # the update is z's VJP with sum_i w_i dL_i/dz (the gradient of sum_i w_i L_i)
            tg = task_gradients(losses, model, "rep")
            assert tg.rep is not None
            R = tg.matrix.reshape(self.num_tasks, *tg.rep.shape)
            J = torch.stack([
                torch.autograd.grad(tg.rep, W, R[i], retain_graph=True)[0]
                for i in range(self.num_tasks)
            ])
        else:
            (J,) = jacobian(losses, [W])  # keeps the graph for the backward below
            tg = None
        # several processes: the norms of the global batch's per-task gradients of W
        distributed.all_reduce(J, "mean")
        norms = J.flatten(1).norm(dim=1).to(w.dtype)  # ||grad_W L_i||
        G = w * norms
        ratio = losses.detach() / self.initial_losses.clamp_min(1e-12)
        r = ratio / ratio.mean()
        target = G.mean() * r**self.alpha
        grad_w = torch.sign(G - target) * norms
        self.w.grad = grad_w.to(self.w) if self.w.grad is None else self.w.grad + grad_w
        if tg is None:
            (w * losses).sum().backward()
        else:
            tg.apply(w.to(tg.matrix.dtype) @ tg.matrix, w)
        self.sync_gradients(model)  # this process's gradients of sum_i w_i L_i -> the mean
        logs = weight_logs(w)
        logs["gradnorm_loss"] = float((G - target).abs().sum())
        return logs


@BALANCERS.register("gradnorm", help="GradNorm (Chen et al. 2018), alpha = 1.5")
def gradnorm(num_tasks: int, alpha: float = 1.5, layer: str | None = None) -> GradNorm:
    return GradNorm(num_tasks, alpha, layer)
