"""Evaluation protocols: how a val/test number is computed, and which numbers may be compared.

``eval.protocol`` (``mtlcv.config.EvalConfig``) names one of two protocols:

* ``exact`` (default): every metric is computed once over the whole split (streaming, see
  :mod:`mtlcv.tasks.base`), so it does not depend on batch size or order; the test numbers of a
  run are those of its best-on-val checkpoint.
* ``published``: the protocol behind the SegNet-MTAN NYUv2 tables of MTAN (Liu et al., CVPR
  2019), CAGrad (Liu et al., NeurIPS 2021), Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et
  al., NeurIPS 2023). Their evaluation code (lorenmt/mtan ``im2im_pred/utils.py``, copied into
  Cranial-XIX/CAGrad ``nyuv2/utils.py``, AvivNavon/nash-mtl and Cranial-XIX/FAMO
  ``experiments/nyuv2/utils.py`` and ``trainer.py``) computes ``depth_error`` and
  ``normal_error`` on each test batch (batch size 2) and accumulates ``value / number of
  batches``: the mean of per-batch values, including the mean of per-batch *medians* of the
  normal angles. Segmentation uses one confusion matrix over the split (``ConfMatrix``), as
  here. Each task declares which applies (``Task.published_aggregation``); a batch without any
  valid pixel is skipped (the official code would divide by zero; on mtan's NYUv2 release every
  test image has valid depth and normals, so the two agree). The papers then report the mean
  of the test metrics of the **last 10 epochs** (nash-mtl ``experiments/nyuv2/README.md``; the
  mtan README says the same of the MTAN paper), not a best-on-val checkpoint: the trainer
  evaluates the test split after each of the last ``eval.last_epochs`` epochs and reports their
  mean (Δm is linear in the metrics, so the Δm of the mean is the mean of the Δm).

The protocol is part of every number: ``results.json`` records it (``"protocol"``), and a Δm
between a run and baselines measured under another protocol is refused in one line unless
``eval.allow_protocol_mismatch`` is true (the named published baselines declare theirs, see
:mod:`mtlcv.analysis.baselines`; a results.json without a ``protocol`` was written by the
exact protocol, the only one before it was recorded).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..analysis.baselines import baseline_protocol
from ..errors import ConfigError
from ..tasks.base import Metric, Task

EXACT, PUBLISHED = "exact", "published"
Metrics = dict[str, dict[str, float]]


class BatchMeanMetric(Metric):
    """The mean over evaluation batches of a task's metrics computed on each batch alone.

    Each batch gets a fresh ``task.new_metric()``; its values are kept per metric and their
    mean taken over the batches where the metric is defined (a batch with no valid pixel gives
    NaN and is left out). This is mtan's ``avg_cost[...] += cost / test_batch`` per metric.

    Several processes (engine/distributed.py): each evaluates a contiguous run of whole batches
    of the split (the batches one process would form), and :meth:`state` / :meth:`merge` carry
    the per-batch values, concatenated in rank order, i.e. the split's batch order; the mean is
    then summed in that order, so the numbers equal one process's bit for bit.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        #: metric -> its finite per-batch values, in batch order
        self.values: dict[str, list[float]] = {}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        m = self.task.new_metric()
        m.update(pred, target)
        for k, v in m.compute().items():
            kept = self.values.setdefault(k, [])
            if math.isfinite(v):
                kept.append(float(v))

    def compute(self) -> dict[str, float]:
        keys = list(self.values) or list(self.task.new_metric().compute())
        out = {}
        for k in keys:
            vals = self.values.get(k, [])
            total = 0.0
            for v in vals:  # in batch order, as the official loop accumulates
                total += v
            out[k] = total / len(vals) if vals else math.nan
        return out

    def state(self) -> dict[str, Any]:
        """The per-batch values so far (plain floats)."""
        return {"values": {k: list(v) for k, v in self.values.items()}}

    def merge(self, state: dict[str, Any]) -> None:
        """Append another shard's per-batch values (its batches follow this one's)."""
        for k, vals in state["values"].items():
            self.values.setdefault(k, []).extend(vals)


def new_metric(task: Task, protocol: str = EXACT) -> Metric:
    """The streaming metric of ``task`` under ``protocol``."""
    if protocol == PUBLISHED and getattr(task, "published_aggregation", "split") == "batch_mean":
        return BatchMeanMetric(task)
    return task.new_metric()


def aggregation(tasks: Mapping[str, Task], protocol: str) -> dict[str, str]:
    """``{task: "split" | "batch_mean"}`` under ``protocol``."""
    if protocol != PUBLISHED:
        return {n: "split" for n in tasks}
    return {n: getattr(t, "published_aggregation", "split") for n, t in tasks.items()}


def mean_metrics(entries: Sequence[Mapping[str, Mapping[str, float]]]) -> Metrics:
    """The per-metric mean of several ``{task: {metric: value}}`` (the last-epochs average)."""
    if not entries:
        raise ValueError("mean_metrics: nothing to average")
    return {
        t: {m: sum(e[t][m] for e in entries) / len(entries) for m in ms}
        for t, ms in entries[0].items()
    }


def describe(cfg: Any, tasks: Mapping[str, Task], epochs: Sequence[int] | None) -> dict[str, Any]:
    """The ``"protocol"`` entry of results.json: what produced every number in it."""
    ev = cfg.eval
    out: dict[str, Any] = {
        "name": ev.protocol,
        "aggregation": aggregation(tasks, ev.protocol),
        "eval_batch_size": cfg.data.eval_batch_size or cfg.data.batch_size,
    }
    if ev.protocol == PUBLISHED:
        out["test"] = f"mean of the test metrics of the last {ev.last_epochs} epochs"
        out["epochs_averaged"] = list(epochs or [])
    else:
        out["test"] = "the best-on-val checkpoint"
    return out


def protocol_of_results(res: Mapping[str, Any]) -> str:
    """The protocol name a results dict was computed under (``exact`` when not recorded)."""
    p = res.get("protocol")
    if isinstance(p, Mapping):
        return str(p.get("name", EXACT))
    return str(p) if p else EXACT


def protocol_of_baselines(spec: str) -> str:
    """The protocol of a ``baselines`` spec: a run directory, a results.json or a named one."""
    path = Path(spec)
    if path.is_dir():
        path = path / "results.json"
    if path.is_file():
        try:
            return protocol_of_results(json.loads(path.read_text()))
        except (json.JSONDecodeError, AttributeError):
            return EXACT  # load_baselines reports an unreadable file in its own words
    return baseline_protocol(spec)


def check_baseline_protocol(cfg: Any) -> str | None:
    """Refuse (one line) a Δm between this run's protocol and its baselines' one.

    Returns the baselines' protocol (None without baselines). Allowed anyway when
    ``eval.allow_protocol_mismatch`` is true.
    """
    if not cfg.baselines:
        return None
    theirs = protocol_of_baselines(cfg.baselines)
    ours = cfg.eval.protocol
    if theirs != ours and not cfg.eval.allow_protocol_mismatch:
        raise ConfigError(
            f"config key 'baselines': {cfg.baselines!r} was measured under the {theirs} "
            f"evaluation protocol but this run uses eval.protocol: {ours}; their Δm is not "
            f"comparable (set eval.protocol: {theirs}, or eval.allow_protocol_mismatch: true to "
            "compare anyway)"
        )
    return theirs


def tests_this_epoch(cfg: Any, epoch: int) -> bool:
    """Whether the trainer evaluates the test split after ``epoch`` (1-based): the published
    protocol averages the test metrics of the last ``eval.last_epochs`` epochs."""
    return cfg.eval.protocol == PUBLISHED and epoch > cfg.train.epochs - cfg.eval.last_epochs


def last_epochs_average(
    history: Sequence[Mapping[str, Any]], last_epoch: int, k: int
) -> tuple[Metrics, Metrics, list[int]]:
    """``(val, test, epochs)``: the mean val and test metrics of the epochs among the last ``k``
    (up to ``last_epoch``) whose test split was evaluated, and those epochs."""
    recs = [h for h in history if "test" in h and last_epoch - k < h["epoch"] <= last_epoch]
    if not recs:
        raise ConfigError(
            f"eval.protocol published: no test evaluation among the last {k} epochs "
            f"(up to epoch {last_epoch}); was train.epochs changed on resume?"
        )
    epochs = [int(h["epoch"]) for h in recs]
    return mean_metrics([h["val"] for h in recs]), mean_metrics([h["test"] for h in recs]), epochs
