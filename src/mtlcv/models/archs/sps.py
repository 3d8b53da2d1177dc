"""Soft parameter sharing (Duong, Cohn, Bird & Cook, "Low Resource Dependency Parsing:
Cross-lingual Parameter Sharing in a Neural Network Parser", ACL 2015, eq. 2).

One network (backbone + head) per task, as in :mod:`.stl`, plus a penalty that pulls the
corresponding backbone parameters of the tasks' networks together; heads differ in shape and are
not penalised (Duong et al. likewise leave the output layer free). ``extra_loss()`` returns

* ``norm: l2`` (Duong et al.): ``penalty * sum_{i<j} ||theta_i - theta_j||^2`` over every
  backbone parameter, computed as ``T * sum_i ||theta_i - mean_theta||^2`` (the same number);
* ``norm: trace`` (Yang & Hospedales, "Trace Norm Regularised Deep Multi-Task Learning", ICLR
  workshop 2017, "last axis flattening"): ``penalty * sum_layers ||W||_*``, the nuclear norm of
  the T x P matrix stacking the T flattened copies of each backbone parameter, which favours
  low-rank (shared) parameter sets without forcing equality.

Duong et al. tune the weight on development data and publish no value that transfers to
vision; the default ``penalty = 0.01`` is ours. With ``penalty = 0`` the model is exactly
:class:`~.stl.SingleTask` (same construction order, so the same initial weights for a seed).

Parameters: no parameter is shared (``shared_parameters()`` is empty); task ``t`` owns its whole
network. No single shared representation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import ConfigError
from ...registry import ARCHS
from .stl import SingleTask

NORMS = ("l2", "trace")


def parameter_distance(groups: list[list[torch.Tensor]], norm: str = "l2") -> torch.Tensor:
    """Sum over groups of corresponding tensors of ``sum_{i<j}||p_i - p_j||^2`` or ``||W||_*``."""
    total = groups[0][0].new_zeros(())
    for ps in groups:
        W = torch.stack([p.reshape(-1) for p in ps])  # [T, P]
        if norm == "l2":
            total = total + W.shape[0] * (W - W.mean(0)).pow(2).sum()
        else:
            total = total + torch.linalg.svdvals(W).sum()
    return total


@ARCHS.register("sps")
class SoftSharing(SingleTask):
    """One network per task + an l2 (or trace-norm) penalty between their backbones."""

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        penalty: float = 0.01,
        norm: str = "l2",
    ) -> None:
        if norm not in NORMS:
            raise ConfigError(
                f"model.options.norm: got {norm!r}, expected one of {', '.join(NORMS)}"
            )
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 0:
            raise ConfigError(f"model.options.penalty: got {penalty!r}, expected a number >= 0")
        super().__init__(tasks, backbone, head)
        self.penalty, self.norm = float(penalty), norm

    def distance(self) -> torch.Tensor:
        """The unweighted penalty: l2 distance or trace norm of the backbone parameters."""
        per_task = [list(self.nets[t].backbone.parameters()) for t in self.tasks]
        return parameter_distance([list(ps) for ps in zip(*per_task)], self.norm)

    def extra_loss(self) -> torch.Tensor | None:
        if self.penalty == 0 or len(self.tasks) < 2:
            return None
        return self.penalty * self.distance()
