"""Scale-invariant loss ("SI"), the baseline of Navon et al., ICML 2022 (Nash-MTL), sec. 6."""

from __future__ import annotations

import torch

from ..registry import BALANCERS
from .base import Weighting


class ScaleInvariant(Weighting):
    """SI: minimise ``sum_t log L_t``, which no rescaling of a task's loss changes.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, sec. 6 (baselines):
    "scale-invariant (SI) ... minimizes sum_t log l_t"; the official code is
    ``ScaleInvariantLinearScalarization`` in AvivNavon/nash-mtl ``methods/weight_methods.py``
    (``sum(log(losses) * task_weights)``, weights 1). Its gradient is ``sum_t grad L_t / L_t``,
    so here the loss weights are ``w_t = 1 / L_t`` (detached; floored at 1e-12, where the log
    would be -inf). The FAMO paper's tables reuse the row. No option, no state.
    """

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return 1.0 / losses.detach().clamp_min(1e-12)


@BALANCERS.register("si", help="scale-invariant loss sum log L_t (Nash-MTL's SI baseline)")
def si(num_tasks: int) -> ScaleInvariant:
    return ScaleInvariant(num_tasks)
