"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting, check_positive, weight_logs

FORMS = ("regression", "classification")


class UncertaintyWeighting(Weighting):
    """Homoscedastic-uncertainty weighting with learned log-variances ``s_t = log sigma_t^2``.

    Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics", CVPR 2018. Per task, with ``sigma_t^2 = exp(s_t)``:

    * regression (eq. 7, Gaussian likelihood): ``1/(2 sigma^2) L + log sigma
      = 0.5 exp(-s) L + 0.5 s``, whose optimum in ``s`` is ``s* = log L``;
    * classification (eq. 10, scaled softmax): ``1/sigma^2 L + log sigma
      = exp(-s) L + 0.5 s``, optimum ``s* = log(2 L)``.

    The ``s_t`` are ``nn.Parameter`` s returned by ``parameters()`` and trained by the trainer's
    optimizer, never weight-decayed; they are in ``state_dict()``. The paper gives neither an
    initial value nor a learning rate. Defaults follow mtan (lorenmt/mtan, ``logsigma =
    [-0.5, ...]`` in every NYUv2 model file; also LibMTL's ``UW``): ``init = -0.5``, trained at
    the model's learning rate (``lr: null``). Nash-MTL's and FAMO's code (``methods/
    weight_methods.py``, ``Uncertainty``) starts at ``0`` and trains them at
    ``--method-params-lr 0.025``: ``init: 0.0, lr: 0.025`` (their published configs do). The
    logged weights are the factors ``c exp(-s_t)`` of ``L_t`` (0.5 or 1 times the precision).

    Args:
        num_tasks: T.
        forms: one of ``"regression"`` / ``"classification"`` for all tasks, or one per task.
            Default ``"regression"`` for every task, as LibMTL and the Nash-MTL code do (the
            balancer is not told task kinds); the paper itself uses the classification form
            for semantic segmentation, e.g. ``["classification", "regression", "regression"]``
            for semseg, depth, normals.
        init: the initial ``s_t`` (mtan's -0.5).
        lr: the learning rate of the ``s_t`` (None: the model's, ``optim.lr``).
    """

    def __init__(
        self,
        num_tasks: int,
        forms: str | Sequence[str] = "regression",
        init: float = -0.5,
        lr: float | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if isinstance(init, bool) or not isinstance(init, (int, float)) or init != init:
            raise ConfigError(f"balancer.options.init must be a number, got {init!r}")
        self.param_lr = None if lr is None else check_positive(lr, "lr")
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
        self.log_var = nn.Parameter(torch.full((num_tasks,), float(init)))

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
def uncertainty(
    num_tasks: int,
    forms: str | Sequence[str] = "regression",
    init: float = -0.5,
    lr: float | None = None,
) -> UncertaintyWeighting:
    return UncertaintyWeighting(num_tasks, forms, init, lr)
