"""Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import Weighting

DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


class RandomLossWeighting(Weighting):
    """RLW: fresh random task weights every step, normalised to sum to 1.

    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning", TMLR 2022, sec. 3: ``lambda = softmax(lambda~)`` with ``lambda~`` drawn
    from ``p(lambda~)``. Distributions: ``"normal"`` (``N(0, I)``, the default of the authors'
    LibMTL code), ``"uniform"`` (``U(0, 1)`` then softmax) and ``"dirichlet"`` (``Dir(1)``,
    already on the simplex, used as is). The weights sum to 1 as in the paper (not to T): with
    Adam this is immaterial, with SGD scale the learning rate by T to match equal weighting.

    Draws use the global torch generator on the losses' device, so runs are reproducible from the
    trainer's seed and resumes restore it. Stateless.
    """

    def __init__(self, num_tasks: int, distribution: str = "normal") -> None:
        super().__init__(num_tasks)
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"balancer.options.distribution is {distribution!r}; expected one of "
                f"{', '.join(DISTRIBUTIONS)}"
            )
        self.distribution = distribution

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        T, kw = self.num_tasks, dict(device=losses.device, dtype=losses.dtype)
        if self.distribution == "normal":
            return torch.softmax(torch.randn(T, **kw), 0)
        if self.distribution == "uniform":
            return torch.softmax(torch.rand(T, **kw), 0)
        # Dir(1) = normalised standard exponentials
        e = -torch.log(torch.rand(T, **kw).clamp_min(1e-12))
        return e / e.sum()


@BALANCERS.register("rlw", help="Random Loss Weighting (Lin et al. 2022), softmax of N(0, I)")
def rlw(num_tasks: int, distribution: str = "normal") -> RandomLossWeighting:
    return RandomLossWeighting(num_tasks, distribution)
