"""Analysis: delta_m, tables, plots, reports."""

from .delta_m import (
    delta_m,
    delta_m_higher_is_better,
    delta_m_per_task,
    main_metrics,
    mean_rank,
    on_baseline_metrics,
)
from .tables import metric_directions

__all__ = [
    "delta_m",
    "delta_m_higher_is_better",
    "delta_m_per_task",
    "main_metrics",
    "mean_rank",
    "metric_directions",
    "on_baseline_metrics",
]
