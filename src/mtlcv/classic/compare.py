"""``mtlcv classic``: a classic multi-task method against single-task models, over seeds.

For every seed the problem is split anew (:mod:`.datasets`), and three estimators are fitted on
the same training samples and scored on the same test samples:

* **MTL**: the method, all tasks at once;
* **STL**: the same family fitted on each task alone (:class:`~.base.PerTask`), each task with
  its own cross-validated strength: the lasso for ℓ2,1, the ℓ2-norm (ridge path) for the trace
  norm, one network per task for the multi-task network, the task's own samples for
  distribution matching;
* **ℓ2**: ridge or ℓ2-logistic regression per task, cross-validated (a common reference).

Per task the metrics are RMSE and MAE (regression, lower is better) or accuracy and ROC AUC
(%, two classes, higher is better). Δm is convention (a) of :mod:`mtlcv.analysis.delta_m`
(mean over all metrics of the signed relative change, lower is better, negative = MTL beats
the baseline), taken per seed and reported as mean ± std over seeds.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..analysis import delta_m
from ..errors import ConfigError
from .base import MultiTaskEstimator, PerTask
from .datasets import DATASETS, TaskData, load
from .feature_selection import L21MultiTask
from .feature_transformation import MultiTaskNetwork
from .instance_based import DistributionMatchingMTL
from .linear import L2Linear
from .low_rank import TraceNormMultiTask
from .solvers import ConvergenceWarning


@dataclass
class Method:
    family: str
    paper: str
    make: Callable[[str, int], MultiTaskEstimator]


METHODS: dict[str, Method] = {
    "network": Method("feature transformation", "Caruana 1997 (shared hidden layers)",
                      lambda loss, seed: MultiTaskNetwork(loss=loss, random_state=seed)),
    "l21": Method("feature selection", "Argyriou et al. 2008; Obozinski et al. 2010 (l2,1)",
                  lambda loss, seed: L21MultiTask(loss=loss, random_state=seed)),
    "trace": Method("low rank", "Ji & Ye 2009; Pong et al. 2010 (trace norm)",
                    lambda loss, seed: TraceNormMultiTask(loss=loss, random_state=seed)),
    "instance": Method("instance based", "Bickel et al. 2008 (distribution matching)",
                       lambda loss, seed: DistributionMatchingMTL(loss=loss, random_state=seed)),
}


def metric_directions(loss: str) -> dict[str, bool]:
    return {"rmse": False, "mae": False} if loss == "squared" else {"accuracy": True,
                                                                      "auc": True}


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (%) by the Mann–Whitney statistic, ties counted half."""
    from sklearn.metrics import roc_auc_score

    return 100.0 * float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


def task_metrics(model: MultiTaskEstimator, data: TaskData) -> dict[str, dict[str, float]]:
    out = {}
    pred = model.predict(data.X_test)
    score = model.decision_function(data.X_test)
    for name, y, p, s in zip(data.tasks, data.y_test, pred, score):
        if data.loss == "squared":
            err = p - y
            out[name] = {"rmse": float(np.sqrt(np.mean(err ** 2))),
                         "mae": float(np.mean(np.abs(err)))}
        else:
            out[name] = {"accuracy": 100.0 * float(np.mean(p == y)), "auc": _auc(y, s)}
    return out


def describe_fit(model: MultiTaskEstimator) -> str:
    """One line on what a fit found and how it converged."""
    parts = []
    models = model.estimators_ if isinstance(model, PerTask) else [model]
    alphas = [a for m in models for a in np.atleast_1d(getattr(m, "alpha_", []))]
    if alphas:
        parts.append("α=" + (f"{alphas[0]:.3g}" if len(alphas) == 1 else
                             f"{min(alphas):.2g}..{max(alphas):.2g}"))
    if isinstance(model, L21MultiTask):
        parts.append(f"{len(model.selected_features_)}/{model.n_features_in_} features")
    if isinstance(model, TraceNormMultiTask):
        parts.append(f"rank {model.rank_}")
    convs = [c for m in models for c in (m.convergence_ if isinstance(m.convergence_, list)
                                         else [m.convergence_])]
    done = sum(c.converged for c in convs)
    iters = max(c.iterations for c in convs)
    gaps = [c.gap for c in convs if not np.isnan(c.gap)]
    conv = f"{done}/{len(convs)} converged, ≤{iters} iterations"
    if gaps:
        conv += f", gap ≤{max(gaps):.1e}"
    return ", ".join(parts + [conv])


def run(method: str, dataset: str, seeds: Sequence[int], train_size: float | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit MTL, STL and ℓ2 for every seed; return per-seed metrics, Δm and their summary."""
    if method not in METHODS:
        raise ConfigError(f"classic: unknown method {method!r}; valid: {', '.join(METHODS)}")
    if dataset not in DATASETS:
        raise ConfigError(f"classic: unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if not seeds:
        raise ConfigError("classic: give at least one seed")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    runs = []
    for seed in seeds:
        data = load(dataset, seed, train_size)
        make = METHODS[method].make
        models = {"mtl": make(data.loss, seed), "stl": PerTask(make(data.loss, seed)),
                  "l2": PerTask(L2Linear(loss=data.loss, random_state=seed))}
        entry: dict[str, Any] = {"seed": seed, "fit": {}}
        for key, model in models.items():
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(data.X_train, data.y_train)
            seconds = time.perf_counter() - start
            entry[key] = task_metrics(model, data)
            note = describe_fit(model)
            entry["fit"][key] = {"seconds": seconds, "summary": note,
                                 "warnings": len(caught)}
            log(f"[seed {seed}] {dataset} {method} {key.upper():>3}: {seconds:6.2f} s  {note}"
                + (f"  ({len(caught)} convergence warnings)" if caught else ""))
        higher = {t: metric_directions(data.loss) for t in data.tasks}
        entry["delta_m"] = {"stl": delta_m(entry["mtl"], entry["stl"], higher),
                            "l2": delta_m(entry["mtl"], entry["l2"], higher),
                            "stl_vs_l2": delta_m(entry["stl"], entry["l2"], higher)}
        runs.append(entry)
    return {"method": method, "family": METHODS[method].family, "paper": METHODS[method].paper,
            "dataset": dataset, "tasks": data.tasks, "loss": data.loss,
            "train_size": data.train_size, "seeds": list(seeds),
            "higher_is_better": {t: metric_directions(data.loss) for t in data.tasks},
            "runs": runs, "summary": summarise(runs, data.tasks)}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"delta_m": {k: _mean_std([r["delta_m"][k] for r in runs])
                                       for k in runs[0]["delta_m"]}}
    for key in ("mtl", "stl", "l2"):
        out[key] = {t: {m: _mean_std([r[key][t][m] for r in runs]) for m in runs[0][key][t]}
                    for t in tasks}
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table (the format of docs/classic.md)."""
    s = result["summary"]
    lines = [f"| task | metric | STL ({result['family']}) | MTL ({result['method']}) | ℓ2 |",
             "| --- | --- | ---: | ---: | ---: |"]
    for t, ms in result["higher_is_better"].items():
        for m, hib in ms.items():
            cells = [f"{s[k][t][m]['mean']:.4g} ± {s[k][t][m]['std']:.2g}"
                     for k in ("stl", "mtl", "l2")]
            lines.append(f"| {t} | {m} {'↑' if hib else '↓'} | " + " | ".join(cells) + " |")
    dm = s["delta_m"]
    lines.append(f"| Δm (a) ↓ | MTL vs STL | | {dm['stl']['mean']:+.2f} ± {dm['stl']['std']:.2f} % "
                 "| |")
    lines.append(f"| Δm (a) ↓ | MTL vs ℓ2 | | {dm['l2']['mean']:+.2f} ± {dm['l2']['std']:.2f} % "
                 "| |")
    return "\n".join(lines)
