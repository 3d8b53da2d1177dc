"""Δm, the relative multi-task performance against single-task baselines, and mean rank.

Two conventions are in use, and they differ in both averaging and sign:

(a) flat, LOWER is better — Liu et al. CAGrad (NeurIPS 2021), Navon et al. Nash-MTL (ICML 2022,
    eq. 9; e.g. Nash-MTL Δm = −4.04 % on NYUv2), Liu et al. FAMO (NeurIPS 2023)::

        Δm = 100/K · Σ_k (−1)^{δ_k} (M_k − B_k) / B_k,   δ_k = 1 if higher is better,

    averaged over all K metrics of all tasks. An improvement on any metric contributes a
    negative term, so Δm < 0 means the model beats its single-task baselines.

(b) per task first, HIGHER is better — Maninis et al. ASTMT (CVPR 2019), Vandenhende et al.
    (TPAMI 2021, Sec. 5.1)::

        Δ_MTL = 100/T · Σ_t (1/n_t) Σ_{j in t} (−1)^{l_j} (M_j − B_j) / B_j,   l_j = 1 if lower
        is better,

    each task's metrics are averaged first, so a task with five metrics weighs as much as a
    task with one. Δ_MTL > 0 means the model beats its baselines.

Both are percentages. :func:`delta_m_higher_is_better` says which way a given convention goes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError

Scores = Mapping[str, Mapping[str, float]]


def delta_m_per_task(
    results: Scores, baselines: Scores, higher_is_better: Mapping[str, Mapping[str, bool]]
) -> dict[str, float]:
    """Per task, 100 × the mean over its metrics of (−1)^{δ} (M − B) / B (convention (a) sign:
    negative = better than the baseline). Every metric in ``results`` is used.
    """
    out = {}
    for task, metrics in results.items():
        if task not in baselines:
            raise ConfigError(f"Δm: task {task!r} has no baseline; baselines: {sorted(baselines)}")
        terms = []
        for metric, value in metrics.items():
            base = baselines[task].get(metric)
            if base is None:
                raise ConfigError(f"Δm: task {task!r} metric {metric!r} has no baseline value")
            if base == 0 or not math.isfinite(base):
                raise ConfigError(
                    f"Δm: baseline of task {task!r} metric {metric!r} is {base}; expected a "
                    "finite non-zero value (Δm divides by it)"
                )
            hib = higher_is_better.get(task, {}).get(metric)
            if hib is None:
                raise ConfigError(
                    f"Δm: direction of task {task!r} metric {metric!r} is unknown "
                    "(missing from higher_is_better)"
                )
            terms.append((-1.0 if hib else 1.0) * (value - base) / base)
        if not terms:
            raise ConfigError(f"Δm: task {task!r} has no metrics")
        out[task] = 100.0 * sum(terms) / len(terms)
    return out


def delta_m(
    results: Scores,
    baselines: Scores,
    higher_is_better: Mapping[str, Mapping[str, bool]],
    per_task_first: bool = False,
) -> float:
    """Δm in percent (see the module docstring for both conventions and their signs).

    ``per_task_first=False`` (default): convention (a), flat over all metrics, lower is better.
    ``per_task_first=True``: convention (b), tasks averaged first, HIGHER is better.

    Example:
        >>> hib = {"semseg": {"miou": True}, "depth": {"abs_err": False}}
        >>> base = {"semseg": {"miou": 40.0}, "depth": {"abs_err": 0.50}}
        >>> res = {"semseg": {"miou": 44.0}, "depth": {"abs_err": 0.45}}
        >>> round(delta_m(res, base, hib), 6)
        -10.0
        >>> round(delta_m(res, base, hib, per_task_first=True), 6)
        10.0
    """
    per_task = delta_m_per_task(results, baselines, higher_is_better)
    if not per_task:
        raise ConfigError("Δm: no results to compare")
    if per_task_first:
        return -sum(per_task.values()) / len(per_task)
    sizes = {t: len(results[t]) for t in per_task}
    return sum(per_task[t] * sizes[t] for t in per_task) / sum(sizes.values())


def on_baseline_metrics(results: Scores, baselines: Scores) -> dict[str, dict[str, float]]:
    """``results`` restricted to the metrics the baselines report.

    A published baseline may report fewer metrics than mtlcv computes (e.g. no depth RMSE in
    the CAGrad paper's SegNet row); Δm must then average exactly the metrics of the literature.
    """
    return {t: {m: v for m, v in ms.items() if m in baselines[t]} for t, ms in results.items()}


def main_metrics(results: Scores, aux_tasks: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """``results`` without the auxiliary tasks: what Δm, mean rank and model selection see."""
    return {t: dict(ms) for t, ms in results.items() if t not in aux_tasks}


def delta_m_higher_is_better(per_task_first: bool = False) -> bool:
    """Direction of :func:`delta_m`: False for convention (a), True for convention (b)."""
    return per_task_first


def mean_rank(
    entries: Sequence[Scores], higher_is_better: Mapping[str, Mapping[str, bool]]
) -> list[float]:
    """Mean rank of each entry over all metrics (1 = best; lower mean rank is better).

    For every (task, metric) the entries are ranked (ties get the average of the ranks they
    span, as ``scipy.stats.rankdata(method="average")``; NaN ranks last); each entry's ranks are
    then averaged over the metrics. Used to pick the best epoch when no single-task baselines
    exist (the mean-rank criterion of e.g. Vandenhende et al. 2021 and LibMTL). Every entry must
    report the same metrics.
    """
    if not entries:
        return []
    keys = [(t, m) for t, ms in entries[0].items() for m in ms]
    if not keys:
        raise ConfigError("mean_rank: the entries report no metrics")
    for i, e in enumerate(entries):
        got = [(t, m) for t, ms in e.items() for m in ms]
        if sorted(got) != sorted(keys):
            raise ConfigError(f"mean_rank: entry {i} reports {sorted(got)}, entry 0 {sorted(keys)}")
    ranks = np.zeros(len(entries))
    for t, m in keys:
        hib = higher_is_better.get(t, {}).get(m)
        if hib is None:
            raise ConfigError(f"mean_rank: direction of task {t!r} metric {m!r} is unknown")
        v = np.array([e[t][m] for e in entries], dtype=np.float64) * (-1.0 if hib else 1.0)
        v = np.where(np.isnan(v), np.inf, v)  # lower is better now; NaN is worst
        ranks += (v[None, :] < v[:, None]).sum(1) + ((v[None, :] == v[:, None]).sum(1) + 1) / 2
    return (ranks / len(keys)).tolist()
