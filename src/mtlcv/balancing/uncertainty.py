"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting, weight_logs

FORMS = ("regression", "classification")


class UncertaintyWeighting(Weighting):
    """Homoscedastic-uncertainty weighting with learned log-variances ``s_t = log sigma_t^2``.

    Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics", CVPR 2018. Per task, with ``sigma_t^2 = exp(s_t)``:

    * regression (eq. 7, Gaussian likelihood): ``1/(2 sigma^2) L + log sigma
      = 0.5 exp(-s) L + 0.5 s``, whose optimum in ``s`` is ``s* = log L``;
    * classification (eq. 10, scaled softmax): ``1/sigma^2 L + log sigma
      = exp(-s) L + 0.5 s``, optimum ``s* = log(2 L)``.

    The ``s_t`` are ``nn.Parameter`` s (initialised to 0, i.e. sigma = 1; the paper has no other
    hyper-parameter) returned by ``parameters()`` and trained by the trainer's optimizer with the
    model; they are in ``state_dict()``. The logged weights are the factors ``c exp(-s_t)`` of
    ``L_t`` (0.5 or 1 times the precision).

    Args:
        num_tasks: T.
        forms: one of ``"regression"`` / ``"classification"`` for all tasks, or one per task.
            Default ``"regression"`` for every task, as LibMTL and the Nash-MTL code do (the
            balancer is not told task kinds); the paper itself uses the classification form
            for semantic segmentation, e.g. ``["classification", "regression", "regression"]``
            for semseg, depth, normals.
    """

    def __init__(self, num_tasks: int, forms: str | Sequence[str] = "regression") -> None:
        super().__init__(num_tasks)
        forms = [forms] * num_tasks if isinstance(forms, str) else list(forms)
        if len(forms) != num_tasks or any(f not in FORMS for f in forms):
            raise ConfigError(
                f"balancer.options.forms is {forms!r}; expected {num_tasks} of "
                f"{', '.join(FORMS)} (or one for all tasks)"
            )
        self.forms = forms
        self.register_buffer(
            "scale", torch.tensor([0.5 if f == "regression" else 1.0 for f in forms]),
            persistent=False,
        )
        self.log_var = nn.Parameter(torch.zeros(num_tasks))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.scale.to(losses.dtype) * torch.exp(-self.log_var.to(losses.dtype))

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        """The objective of eq. 7/10: ``sum_t c_t exp(-s_t) L_t + 0.5 s_t``."""
        return (self.weights(losses) * losses + 0.5 * self.log_var.to(losses.dtype)).sum()

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        self.total(losses).backward()
        self.sync_gradients(model)
        return weight_logs(self.weights(losses))


@BALANCERS.register("uncertainty", help="uncertainty weighting (Kendall et al. 2018)")
def uncertainty(num_tasks: int, forms: str | Sequence[str] = "regression") -> UncertaintyWeighting:
    return UncertaintyWeighting(num_tasks, forms)
