"""DSelect-k (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, "DSelect-k:
Differentiable Selection in the Mixture of Experts with Applications to Multi-Task Learning",
NeurIPS 2021, sec. 3, eq. 4-7), the per-example gate.

MMoE's softmax gate replaced by a differentiable *sparse* gate that picks at most ``k`` of the
``m`` shared experts. Each of ``k`` single-expert selectors holds ``ceil(log2 m)`` binary
variables ``z``, relaxed by the smooth-step function
``S(t) = 0 (t <= -gamma/2), 1 (t >= gamma/2), -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2`` otherwise;
selector ``i`` puts weight ``r_i(e) = prod_b (S(z_ib) if bit b of e is 1 else 1 - S(z_ib))`` on
expert ``e`` (a one-hot once every ``S`` is binary), and the experts' weights are
``sum_i softmax(alpha)_i r_i``. In the per-example gate ``z = Z x`` and ``alpha = A x`` are linear
in the input (here the average-pooled image, as :mod:`.mmoe`'s gates). Initialisation as the
official TensorFlow code (``dselect_k_moe``) and LibMTL: ``Z ~ U(-gamma/100, gamma/100)``,
``A ~ U(-0.05, 0.05)``.

Regulariser (sec. 3.3; ``extra_loss()``, which the trainer adds after balancing): the entropy of
each selector's distribution, ``-sum r log(r + 1e-6)``, times ``entropy_weight`` (1e-6 in
LibMTL's port, our default), which drives the ``S`` to binary values; when ``m`` is not a power
of two, ``sum 1 / sum_e r_i(e)`` keeps the selectors off codes of non-existent experts (as
LibMTL). LibMTL calls ``backward`` on it inside ``forward``; here it is an architecture loss.
Defaults ``k = 2`` (``num_nonzeros``) and ``gamma = 1.0`` are LibMTL's; ``num_experts = 4`` is
ours.

Parameters: shared = the experts; task ``t`` = its gate (``Z``, ``A``) and head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import ARCHS
from ..build import build_backbone, build_head
from .mmoe import ExpertMixture, check_count, check_pool


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hazimeh et al., eq. 4: a cubic from 0 at ``-gamma/2`` to 1 at ``gamma/2``, C1-smooth."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t),
                       torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectGate(nn.Module):
    """The per-example DSelect-k gate: ``[B, ...] -> [B, m]`` expert weights (sum 1)."""

    def __init__(self, in_features: int, num_experts: int, k: int, gamma: float,
                 pool: Sequence[int]) -> None:
        super().__init__()
        self.m, self.k, self.gamma = num_experts, k, gamma
        self.bits = max(1, math.ceil(math.log2(num_experts)))
        self.pool = nn.AdaptiveAvgPool2d(tuple(pool))
        self.z = nn.Linear(in_features, k * self.bits)
        self.alpha = nn.Linear(in_features, k)
        nn.init.uniform_(self.z.weight, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.z.bias, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.alpha.weight, -0.05, 0.05)
        nn.init.uniform_(self.alpha.bias, -0.05, 0.05)
        codes = [[(e >> (self.bits - 1 - b)) & 1 for b in range(self.bits)]
                 for e in range(num_experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)
        #: the pooled gate input of the last forward (detached), for the regulariser
        self.last_input: torch.Tensor | None = None

    def selectors(self, f: torch.Tensor) -> torch.Tensor:
        """The ``k`` selectors' distributions over the experts, ``[B, k, m]``."""
        s = smooth_step(self.z(f).view(-1, self.k, 1, self.bits), self.gamma)  # [B, k, 1, bits]
        return torch.where(self.codes[None, None], s, 1 - s).prod(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pool(x).flatten(1)
        self.last_input = f.detach()
        w = torch.softmax(self.alpha(f), dim=-1)  # [B, k]
        return torch.einsum("bk,bkm->bm", w, self.selectors(f))

    def regulariser(self) -> torch.Tensor | None:
        """The regulariser on the last forward's input, as a fresh graph (the balancer has
        already freed the forward's)."""
        if self.last_input is None:
            return None
        r = self.selectors(self.last_input)
        loss = -(r * torch.log(r + 1e-6)).sum()
        if self.m != 2**self.bits:
            loss = loss + (1.0 / r.sum(-1)).sum()
        return loss


@ARCHS.register("dselect_k")
class DSelectK(ExpertMixture):
    """Shared experts mixed by a sparse differentiable top-k gate per task (Hazimeh et al. 2021)."""

    has_representation = False

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        num_experts: int = 4,
        num_nonzeros: int = 2,
        gamma: float = 1.0,
        entropy_weight: float = 1e-6,
        gate_pool: Sequence[int] = (8, 8),
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        m = check_count(num_experts, "num_experts", 2)
        k = check_count(num_nonzeros, "num_nonzeros")
        if k > m:
            raise ConfigError(f"model.options.num_nonzeros: got {k}, more than num_experts {m}")
        for key, v in (("gamma", gamma), ("entropy_weight", entropy_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (
                    key == "gamma" and v == 0):
                raise ConfigError(f"model.options.{key}: got {v!r}, expected a number > 0"
                                  + (" (or 0)" if key == "entropy_weight" else ""))
        pool = check_pool(gate_pool)
        self.entropy_weight = float(entropy_weight)
        self.experts = nn.ModuleList(build_backbone(backbone) for _ in range(m))
        C = self.experts[0].out_channels
        self.gates = nn.ModuleDict(
            {t: DSelectGate(3 * pool[0] * pool[1], m, k, float(gamma), pool) for t in self.tasks})
        self.heads = nn.ModuleDict({t: build_head(head, C, task) for t, task in tasks.items()})

    def extra_loss(self) -> torch.Tensor | None:
        if not self.training or self.entropy_weight == 0:
            return None
        terms = [g.regulariser() for g in self.gates.values()]
        terms = [t for t in terms if t is not None]
        return self.entropy_weight * sum(terms) if terms else None
