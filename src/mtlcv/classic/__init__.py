"""Classic (pre-deep) multi-task learning, organised by what the tasks share."""

from .base import MultiTaskEstimator, PerTask
from .feature_selection import L21MultiTask, prox_l21
from .linear import L2Linear, LinearMultiTask
from .low_rank import TraceNormMultiTask, prox_trace
from .solvers import Convergence, ConvergenceWarning, apg

__all__ = [
    "Convergence",
    "ConvergenceWarning",
    "L21MultiTask",
    "L2Linear",
    "LinearMultiTask",
    "MultiTaskEstimator",
    "PerTask",
    "TraceNormMultiTask",
    "apg",
    "prox_l21",
    "prox_trace",
]
