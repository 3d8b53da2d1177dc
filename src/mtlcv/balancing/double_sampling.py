"""Double sampling: gradient methods whose weights need two independent gradient samples per
step (MoDo, SDMGrad)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import GradientBalancer, _check_matrix

SAMPLES = ("previous", "same")


class DoubleSampling(GradientBalancer):
    """Base of methods whose weights come from the product of two *independent* gradient samples.

    The papers draw three mini-batches per step (``z1``, ``z2`` for the weights, ``z3`` for the
    update); :meth:`aggregate_samples` implements that update exactly. A balancer sees one batch,
    so :meth:`aggregate` chooses the samples with ``samples``:

    * ``"previous"`` (default): ``G1`` = the previous step's gradients (an independent batch, at
      the parameters one step earlier), ``G2 = G3`` = this step's. ``E[G1 G2^T]`` then estimates
      the Gramian of the expected gradients without the noise term that ``G G^T`` carries on its
      diagonal (the bias double sampling removes), up to one step of parameter drift. The first
      step uses ``G1 = G2``.
    * ``"same"``: ``G1 = G2 = G3`` = this step's gradients (the biased single-sample version).

    State: the previous step's ``G`` (T x P, with ``"previous"``).
    """

    def __init__(self, num_tasks: int, samples: str = "previous", mode: str | None = None,
                 batched: bool = True) -> None:
        super().__init__(num_tasks, mode, batched)
        if samples not in SAMPLES:
            raise ConfigError(
                f"balancer.options.samples is {samples!r}; expected one of {', '.join(SAMPLES)}"
            )
        self.samples = samples
        self.prev: torch.Tensor | None = None

    def aggregate_samples(self, G1: torch.Tensor, G2: torch.Tensor,
                          G3: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        G = _check_matrix(G, self.num_tasks).detach()
        G1 = G
        if self.samples == "previous":
            if self.prev is not None and self.prev.shape == G.shape:
                G1 = self.prev.to(G)
            self.prev = G.clone()
        return self.aggregate_samples(G1, G, G)

    def get_extra_state(self) -> Any:
        return {"prev": None if self.prev is None else self.prev.detach().cpu()}

    def set_extra_state(self, state: Any) -> None:
        p = state.get("prev") if isinstance(state, dict) else None
        self.prev = p
