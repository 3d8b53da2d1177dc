"""Task balancing: loss weighting and gradient aggregation (see :mod:`mtlcv.balancing.base`).

Registered names (``mtlcv.balancing.create(name, num_tasks=T, **options)``):

============  ================================  =====================  =====================
name          method                            family                 gradient space (exact)
============  ================================  =====================  =====================
fixed         fixed / equal weights             loss weighting         -
uncertainty   Kendall et al. 2018               loss weighting         -
dwa           Liu et al. 2019                   loss weighting         -
gradnorm      Chen et al. 2018                  loss weighting         last shared layer
dtp           Guo et al. 2018                   loss weighting         -
rlw           Lin et al. 2022                   loss weighting         -
si            Navon et al. 2022 (SI baseline)   loss weighting         -
famo          Liu et al. 2023                   loss weighting         -
imtl-l        Liu et al. 2021 (IMTL-L)          loss weighting         -
graddrop      Chen et al. 2020                  gradient aggregation   rep (exact)
pcgrad        Yu et al. 2020                    gradient aggregation   param (exact)
mgda          Sener & Koltun 2018               gradient aggregation   param (exact)
mgda-ub       Sener & Koltun 2018               gradient aggregation   rep (exact for UB)
cagrad        Liu et al. 2021                   gradient aggregation   param (exact)
nashmtl       Navon et al. 2022                 gradient aggregation   param (exact)
imtl-g        Liu et al. 2021 (IMTL-G)          gradient aggregation   param (exact)
imtl          Liu et al. 2021 (hybrid)          gradient aggregation   param (exact)
aligned-mtl   Senushkin et al. 2023             gradient aggregation   param (exact)
upgrad        Quinton & Rey 2024 (torchjd)      gradient aggregation   param (exact)
gradvac       Wang et al. 2021                  gradient aggregation   param (exact)
dbmtl         Lin et al. 2023                   gradient aggregation   param (exact)
gls           Chennupati et al. 2019            loss weighting         -
stch          Lin et al. 2024                   loss weighting         -
moco          Fernando et al. 2023              gradient aggregation   param (exact)
excessmtl     He et al. 2024                    gradient aggregation   param (exact)
fairgrad      Ban & Ji 2024                     gradient aggregation   param (exact)
sdmgrad       Xiao et al. 2023                  gradient aggregation   param (exact)
modo          Chen et al. 2023                  gradient aggregation   param (exact)
config        Liu et al. 2025 (ConFIG)          gradient aggregation   param (exact)
dualproj      Quinton & Rey 2024 (torchjd)      gradient aggregation   param (exact)
autol         Liu et al. 2022 (Auto-λ)          loss weighting         - (meta: held-out)
============  ================================  =====================  =====================

Every gradient method takes ``mode="param" | "rep"``; "rep" (representation gradients, the
MGDA-UB shortcut) is an approximation for all but mgda-ub and graddrop. See jacobian.py.
"""

from __future__ import annotations

from typing import Any

from ..registry import BALANCERS
from . import (  # noqa: F401  (registers)
    aligned_mtl,
    autol,
    cagrad,
    conflictfree,
    dbmtl,
    dtp,
    dualproj,
    dwa,
    excessmtl,
    fairgrad,
    famo,
    fixed,
    gls,
    graddrop,
    gradnorm,
    gradvac,
    imtl,
    mgda,
    moco,
    modo,
    nashmtl,
    pcgrad,
    rlw,
    sdmgrad,
    si,
    stch,
    uncertainty,
    upgrad,
)
from .base import Balancer, GradientBalancer, Weighting

__all__ = ["Balancer", "GradientBalancer", "Weighting", "create"]


def create(name: str, num_tasks: int, **options: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``num_tasks`` tasks.

    Example:
        >>> import torch
        >>> from mtlcv import balancing
        >>> b = balancing.create("fixed", num_tasks=2, weights=[1.0, 0.5])
        >>> b.weights(torch.ones(2)).tolist()
        [1.0, 0.5]
        >>> m = balancing.create("mgda", num_tasks=2)
        >>> m.aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist()
        [0.5, 0.5]
    """
    return BALANCERS.create(name, where="balancer", num_tasks=num_tasks, **options)
