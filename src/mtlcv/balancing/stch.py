"""STCH: smooth Tchebycheff scalarization (Lin, Zhang, Yang, Liu, Wang & Zhang, ICML 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting, check_positive, weight_logs


class SmoothTchebycheff(Weighting):
    """STCH: minimise ``mu log sum_t exp(l_t / mu)``, a smooth maximum of the task objectives.

    Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024,
    eq. 8: ``g_mu(x) = mu log sum_t exp(lambda_t (f_t(x) - z_t) / mu)``, which bounds the
    Tchebycheff scalarization ``max_t lambda_t (f_t - z_t)`` from above by at most ``mu log T``
    (Proposition 3.3) and tends to it as ``mu -> 0``. Its gradient is ``sum_t s_t grad l_t`` with
    ``s = softmax(l / mu)``: the worst task gets the largest weight, smoothly.

    The authors' multi-task code (github.com/Xi-L/STCH, ``STCH_MTL``, which LibMTL adopted)
    applies it to the log of normalised losses, ``l_t = log(L_t / z_t + 1e-20)`` with preference
    ``lambda_t = 1``, scaled by T, and needs the nadir vector ``z``: for the first
    ``warmup_epochs`` epochs it minimises ``sum_t log(L_t + 1e-20)``; the mean training loss of
    each task over the epoch that follows (still on the log objective) becomes ``z``, and STCH
    starts after it. We follow that code: ``mu = 1`` and ``warmup_epochs = 4`` are its defaults
    (the NYUv2 and Cityscapes settings). The epoch count and the mean losses come from
    ``on_epoch_end``, which the trainer calls with exactly those per-epoch mean losses.

    The update is the gradient of the objective, written as loss weights
    ``w_t = T s_t / (L_t + 1e-20 z_t)`` (``1 / (L_t + 1e-20)`` during the warm-up), which are
    logged. State (in ``state_dict()``): the epoch count and ``z``.
    """

    def __init__(self, num_tasks: int, mu: float = 1.0, warmup_epochs: int = 4) -> None:
        super().__init__(num_tasks)
        self.mu = check_positive(mu, "mu")
        bad = isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int)
        if bad or warmup_epochs < 0:
            raise ConfigError(
                f"balancer.options.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}"
            )
        self.warmup_epochs = warmup_epochs
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("has_nadir", torch.zeros((), dtype=torch.bool))

    def scalarized(self, losses: torch.Tensor) -> torch.Tensor:
        """The objective: ``T mu logsumexp(log(L / z + 1e-20) / mu)`` (after the warm-up)."""
        if not bool(self.has_nadir):
            return torch.log(losses + 1e-20).sum()
        z = self.nadir.to(losses)
        ell = torch.log(losses / z + 1e-20)
        return self.num_tasks * self.mu * torch.logsumexp(ell / self.mu, 0)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        L = losses.detach()
        if not bool(self.has_nadir):
            return 1.0 / (L + 1e-20)
        z = self.nadir.to(L)
        ell = torch.log(L / z + 1e-20)
        s = torch.softmax(ell / self.mu, 0)
        return self.num_tasks * s / (L + 1e-20 * z)

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        w = self.weights(losses)
        (w * losses).sum().backward()  # the objective's gradient, w held constant
        return weight_logs(w)

    def on_epoch_end(
        self, epoch: int, train_losses: Sequence[float], kpis: Sequence[float] | None = None
    ) -> None:
        self.epochs += 1
        if not bool(self.has_nadir) and int(self.epochs) == self.warmup_epochs + 1:
            if len(train_losses) != self.num_tasks:
                raise ConfigError(
                    f"STCH got {len(train_losses)} epoch losses; expected {self.num_tasks}"
                )
            z = torch.tensor([float(v) for v in train_losses], dtype=torch.float64)
            self.nadir.copy_(z.clamp_min(1e-12).to(self.nadir.device))
            self.has_nadir.fill_(True)


@BALANCERS.register("stch", help="Smooth Tchebycheff scalarization (Lin et al. 2024), mu = 1")
def stch(num_tasks: int, mu: float = 1.0, warmup_epochs: int = 4) -> SmoothTchebycheff:
    return SmoothTchebycheff(num_tasks, mu, warmup_epochs)
