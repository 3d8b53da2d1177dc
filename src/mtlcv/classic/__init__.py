"""Classic (pre-deep) multi-task learning, organised by what the tasks share.

* feature transformation: :class:`MultiTaskNetwork` (Caruana 1997), in
  :mod:`.feature_transformation`;
* feature selection: :class:`L21MultiTask` (ℓ2,1 norm), in :mod:`.feature_selection`;
* low rank: :class:`TraceNormMultiTask` (trace norm), in :mod:`.low_rank`;
* instance based: :class:`DistributionMatchingMTL` (Bickel et al. 2008), in
  :mod:`.instance_based`;

with :class:`PerTask` (any of them as independent single-task models), :class:`L2Linear`
(ridge / ℓ2-logistic), the solver :func:`apg`, the data sets of :mod:`.datasets` and the
comparison behind ``mtlcv classic`` in :mod:`.compare`. See docs/classic.md.
"""

from .base import MultiTaskEstimator, PerTask
from .feature_selection import L21MultiTask, prox_l21
from .feature_transformation import MultiTaskNetwork
from .instance_based import DistributionMatchingMTL
from .linear import L2Linear, LinearMultiTask
from .low_rank import TraceNormMultiTask, prox_trace
from .solvers import Convergence, ConvergenceWarning, apg

__all__ = [
    "Convergence",
    "ConvergenceWarning",
    "DistributionMatchingMTL",
    "L21MultiTask",
    "L2Linear",
    "LinearMultiTask",
    "MultiTaskEstimator",
    "MultiTaskNetwork",
    "PerTask",
    "TraceNormMultiTask",
    "apg",
    "prox_l21",
    "prox_trace",
]
