"""Figures of runs and grids: training curves, task weights, gradient conflict, task affinity,
Pareto fronts and ranks.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (so nothing
here touches a user's interactive backend or global state); :func:`save` writes it as PNG
through matplotlib's Agg renderer. Inputs are plain data read from run directories:

* a *history* is the list of ``metrics.jsonl`` records of one run (one per epoch);
* a *series* maps a label (a variant) to the histories of its seeds; lines are the mean over
  seeds and the band spans the lowest to the highest seed;
* *gradient records* are the lines of ``gradients.jsonl`` (:mod:`mtlcv.engine.gradient_log`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

History = list[dict[str, Any]]
Series = Mapping[str, Sequence[History]]

#: a colour per line; with more labels than colours the line styles change too
_STYLES = ("-", "--", ":", "-.")


def _colour(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _style(i: int) -> str:
    return _STYLES[(i // 10) % len(_STYLES)]


def save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG (Agg) and return the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")  # constrained layout already fits the margins
    return path


def _stack(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """Seeds × epochs, NaN-padded where a seed has fewer epochs (an unfinished run)."""
    n = max(len(c) for c in curves)
    out = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = c
    return out


def _band(ax: Any, x: np.ndarray, ys: np.ndarray, i: int, label: str) -> None:
    """Mean over seeds as a line, lowest to highest seed as a band."""
    with np.errstate(all="ignore"):
        ok = ~np.all(np.isnan(ys), axis=0)
        if not ok.any():
            return
        mean = np.nanmean(ys[:, ok], axis=0)
        ax.plot(x[ok], mean, _style(i), color=_colour(i), label=label, lw=1.4)
        if ys.shape[0] > 1:
            lo, hi = np.nanmin(ys[:, ok], axis=0), np.nanmax(ys[:, ok], axis=0)
            ax.fill_between(x[ok], lo, hi, color=_colour(i), alpha=0.18, lw=0)


def _grid(n: int, cols: int, w: float = 3.0, h: float = 2.3) -> tuple[Figure, list[Any]]:
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(w * cols, h * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _legend(fig: Figure, axes: Sequence[Any], n: int) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False,
                   ncols=1 if n <= 20 else 2)


def curves_figure(
    series: Series, higher: Mapping[str, Mapping[str, bool]]
) -> Figure:
    """Training loss and every val metric per task over epochs, one line per label.

    One panel per (task, quantity): the task's training loss first, then its val metrics
    (the arrow says which way is better).
    """
    from matplotlib.ticker import MaxNLocator

    rows = [[(task, "train loss", None)]
            + [(task, f"val {m} {'↑' if hib else '↓'}", m) for m, hib in metrics.items()]
            for task, metrics in higher.items()]
    cols = max(len(r) for r in rows)
    fig = Figure(figsize=(2.9 * cols, 2.3 * len(rows)), layout="constrained")
    grid = fig.subplots(len(rows), cols, squeeze=False)
    axes, panels = [], []
    for r, row in enumerate(rows):
        for c in range(cols):
            if c < len(row):
                axes.append(grid[r, c])
                panels.append(row[c])
            else:
                grid[r, c].set_visible(False)
    for ax, (task, title, metric) in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for i, (label, runs) in enumerate(series.items()):
            if metric is None:
                curves = [[h["train_loss"].get(task, math.nan) for h in hist] for hist in runs]
            else:
                curves = [[h["val"].get(task, {}).get(metric, math.nan) for h in hist]
                          for hist in runs]
            ys = _stack(curves)
            _band(ax, np.arange(1, ys.shape[1] + 1), ys, i, label)
        ax.set_title(f"{task}: {title}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _legend(fig, axes, len(series))
    return fig


def delta_m_figure(series: Series) -> Figure | None:
    """Δm on val (against the baselines, lower is better) over epochs; None when no run has it."""
    have = {k: v for k, v in series.items() if any("delta_m" in h for hist in v for h in hist)}
    if not have:
        return None
    fig = Figure(figsize=(6.5, 3.2), layout="constrained")
    ax = fig.subplots()
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, (label, runs) in enumerate(have.items()):
        ys = _stack([[h.get("delta_m", math.nan) for h in hist] for hist in runs])
        _band(ax, np.arange(1, ys.shape[1] + 1), ys, i, label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val Δm % (lower is better)")
    ax.grid(alpha=0.3)
    _legend(fig, [ax], len(have))
    return fig


_WEIGHT = re.compile(r"^w(\d+)$")


def task_weights(history: History, tasks: Sequence[str]) -> np.ndarray | None:
    """Epochs × tasks: the balancer's mean task weights per epoch (``w0``, ``w1``... logs)."""
    rows = []
    for h in history:
        logs = h.get("balancer") or {}
        w = {int(m.group(1)): v for k, v in logs.items() if (m := _WEIGHT.match(k))}
        if not w:
            return None
        rows.append([w.get(t, math.nan) for t in range(len(tasks))])
    return np.array(rows, dtype=float) if rows else None


def weights_figure(series: Series, tasks: Sequence[str],
                   skip_constant: bool = False) -> Figure | None:
    """Task weights over epochs, one panel per label with weights, one line per task.

    ``skip_constant`` leaves out labels whose weights never change (fixed weights), for grids.
    """
    from matplotlib.ticker import MaxNLocator

    have = {}
    for label, runs in series.items():
        ws = [w for hist in runs if (w := task_weights(hist, tasks)) is not None]
        if ws and skip_constant and all(np.allclose(w, w[:1]) for w in ws):
            continue
        if ws:
            have[label] = ws
    if not have:
        return None
    fig, axes = _grid(len(have), 4, 3.0, 2.2)
    for ax, (label, ws) in zip(axes, have.items()):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        n = max(len(w) for w in ws)
        for t, task in enumerate(tasks):
            ys = _stack([w[:, t] for w in ws])
            _band(ax, np.arange(1, n + 1), ys, t, task)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _legend(fig, axes, len(tasks))
    return fig


def _matrix(records: Sequence[dict[str, Any]], key: str, scale_by_lr: bool = False) -> np.ndarray:
    """Steps × T × T array of ``key`` (None -> NaN), optionally divided by each step's lr."""
    arr = np.array([[[math.nan if v is None else v for v in row] for row in r[key]]
                    for r in records], dtype=float)
    if scale_by_lr:
        arr = arr / np.array([r["lr"] for r in records], dtype=float)[:, None, None]
    return arr


def _heatmap(ax: Any, M: np.ndarray, tasks: Sequence[str], vmax: float, fmt: str,
             cmap: str = "RdBu") -> Any:
    im = ax.imshow(M, cmap=cmap, vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if np.isfinite(M[i, j]):
                ax.text(j, i, format(M[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if abs(M[i, j]) > 0.6 * vmax else "black")
    return im


def _vmax(*arrays: np.ndarray, offdiag: bool = False) -> float:
    """The largest |value| (for a symmetric colour scale); ``offdiag``: of the off-diagonal
    entries only (a task's affinity with itself is far larger than with the others and would
    wash the others out; the diagonal then saturates, its value is printed in the cell)."""
    parts = []
    for a in arrays:
        if offdiag and a.ndim == 2 and a.shape[0] > 1:
            a = a[~np.eye(a.shape[0], dtype=bool)]
        parts.append(a[np.isfinite(a)].ravel())
    finite = np.concatenate(parts) if parts else np.zeros(0)
    v = float(np.abs(finite).max()) if finite.size else 1.0
    return v if v > 0 else 1.0


def _pairs(T: int, ordered: bool) -> list[tuple[int, int]]:
    if ordered:
        return [(i, j) for i in range(T) for j in range(T) if i != j]
    return [(i, j) for i in range(T) for j in range(i + 1, T)]


def conflict_figure(records: Sequence[dict[str, Any]], tasks: Sequence[str]) -> Figure:
    """Pairwise cosine of the per-task gradients over training, and its mean as a matrix."""
    C = _matrix(records, "cosine")
    x = np.array([r["global_step"] for r in records])
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax, axm = fig.subplots(1, 2, width_ratios=[2.2, 1])
    for k, (i, j) in enumerate(_pairs(len(tasks), ordered=False)):
        ax.plot(x, C[:, i, j], _style(k), color=_colour(k), lw=1.0, alpha=0.9,
                label=f"{tasks[i]} · {tasks[j]}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("cos(g_i, g_j)")
    ax.set_title("gradient cosine of the shared parameters (< 0: conflict)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    with np.errstate(all="ignore"):
        mean = np.nanmean(C, axis=0)
    im = _heatmap(axm, mean, tasks, 1.0, ".2f")
    axm.set_title(f"mean over {len(records)} logged steps", fontsize=9)
    fig.colorbar(im, ax=axm, shrink=0.8)
    return fig


def affinity_figure(records: Sequence[dict[str, Any]], tasks: Sequence[str],
                    panels: int = 4) -> Figure:
    """TAG lookahead affinity ``Z_{i->j} / lr`` as a T × T matrix over time, and per pair.

    Row i, column j: how a step on task i's loss changed task j's loss on the same batch
    (> 0: it lowered it). The training is cut into ``panels`` equal spans of logged steps;
    each matrix is the mean over its span (the paper averages over steps). The colour scale
    is set by the off-diagonal entries (the diagonal saturates; its values are printed).
    """
    Z = _matrix(records, "affinity", scale_by_lr=True)
    x = np.array([r["global_step"] for r in records])
    spans = [s for s in np.array_split(np.arange(len(records)), min(panels, len(records)))
             if len(s)]
    with np.errstate(all="ignore"):
        means = [np.nanmean(Z[s], axis=0) for s in spans]
    vmax = _vmax(*means, offdiag=True)
    fig = Figure(figsize=(2.6 * len(spans) + 0.6, 5.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.05, 1])
    axes = top.subplots(1, len(spans), squeeze=False).ravel()
    im = None
    for ax, s, M in zip(axes, spans, means):
        im = _heatmap(ax, M, tasks, vmax, ".2g")
        ax.set_title(f"steps {x[s[0]]}–{x[s[-1]]}", fontsize=8)
        ax.set_ylabel("step on task i", fontsize=7)
        ax.set_xlabel("loss of task j", fontsize=7)
    top.colorbar(im, ax=axes.tolist(), shrink=0.8, label="Z / lr")
    top.suptitle("inter-task affinity Z_{i→j} / lr (TAG, Fifty et al. 2021; > 0: i helps j)",
                 fontsize=9)
    ax = bottom.subplots()
    for k, (i, j) in enumerate(_pairs(len(tasks), ordered=True)):
        ax.plot(x, Z[:, i, j], _style(k), color=_colour(k), lw=1.0,
                label=f"{tasks[i]} → {tasks[j]}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("Z / lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, ncols=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def matrices_figure(mats: Mapping[str, np.ndarray], tasks: Sequence[str], title: str,
                    symmetric_vmax: float | None = None, fmt: str = ".2f",
                    offdiag: bool = False) -> Figure:
    """One T × T heat map per label (e.g. each variant's mean affinity), on one colour scale
    (set by the off-diagonal entries with ``offdiag``)."""
    fig, axes = _grid(len(mats), 5, 2.6, 2.5)
    vmax = symmetric_vmax or _vmax(*mats.values(), offdiag=offdiag)
    im = None
    for ax, (label, M) in zip(axes, mats.items()):
        im = _heatmap(ax, M, tasks, vmax, fmt)
        ax.set_title(label, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return fig


def pareto_front(points: np.ndarray, higher: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (better or equal in both, better in
    one), with each axis oriented by ``higher``."""
    sign = np.array([1.0 if h else -1.0 for h in higher])
    p = points * sign
    keep = np.ones(len(p), dtype=bool)
    for i in range(len(p)):
        dominated = np.all(p >= p[i], axis=1) & np.any(p > p[i], axis=1)
        keep[i] = not dominated.any()
    return keep & np.all(np.isfinite(points), axis=1)


def pareto_figure(
    rows: Sequence[dict[str, Any]],
    a: tuple[str, str],
    b: tuple[str, str],
    higher: Mapping[str, Mapping[str, bool]],
    spread: Mapping[str, tuple[float, float]] | None = None,
) -> Figure:
    """Every variant's mean test value of metric ``a`` against ``b``; the front is highlighted.

    ``spread`` (label -> (std of a, std of b) over seeds) draws error bars.
    """
    ha, hb = higher[a[0]][a[1]], higher[b[0]][b[1]]
    pts = np.array([[r["test"][a[0]][a[1]], r["test"][b[0]][b[1]]] for r in rows], dtype=float)
    front = pareto_front(pts, (ha, hb))
    fig = Figure(figsize=(6.5, 4.6), layout="constrained")
    ax = fig.subplots()
    for k, r in enumerate(rows):
        sx, sy = (spread or {}).get(r["label"], (0.0, 0.0))
        ax.errorbar(pts[k, 0], pts[k, 1], xerr=sx or None, yerr=sy or None, fmt="o",
                    color="C3" if front[k] else "0.45", ms=5, capsize=2, lw=0.8)
        ax.annotate(r["label"], pts[k], xytext=(4, 3), textcoords="offset points", fontsize=7,
                    color="C3" if front[k] else "0.3")
    order = np.argsort(pts[front, 0])
    ax.plot(pts[front, 0][order], pts[front, 1][order], "-", color="C3", lw=1, alpha=0.6,
            label="Pareto front")
    ax.set_xlabel(f"{a[0]} {a[1]} {'→ better' if ha else '← better'}")
    ax.set_ylabel(f"{b[0]} {b[1]} {'↑ better' if hb else '↓ better'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig


def metric_ranks(
    rows: Sequence[dict[str, Any]], higher: Mapping[str, Mapping[str, bool]]
) -> tuple[list[str], np.ndarray]:
    """Column names ``task metric`` and the rank (1 = best, ties averaged) of every row on every
    metric of its mean test results."""
    cols = [(t, m) for t, ms in higher.items() for m in ms]
    R = np.zeros((len(rows), len(cols)))
    for c, (t, m) in enumerate(cols):
        v = np.array([r["test"][t][m] for r in rows], dtype=float)
        v = -v if higher[t][m] else v
        v = np.where(np.isnan(v), np.inf, v)
        R[:, c] = (v[None, :] < v[:, None]).sum(1) + ((v[None, :] == v[:, None]).sum(1) + 1) / 2
    return [f"{t} {m}" for t, m in cols], R


def rank_figure(rows: Sequence[dict[str, Any]], higher: Mapping[str, Mapping[str, bool]]) -> Figure:
    """Rank of every variant on every test metric (1 = best), sorted by the mean rank."""
    names, R = metric_ranks(rows, higher)
    mean = R.mean(1)
    order = np.argsort(mean, kind="stable")
    labels = [rows[k]["label"] for k in order]
    M = np.concatenate([R[order], mean[order, None]], axis=1)
    fig = Figure(figsize=(0.55 * (len(names) + 1) + 2.5, 0.3 * len(rows) + 1.8),
                 layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(M, cmap="viridis_r", vmin=1, vmax=len(rows), aspect="auto")
    ax.set_xticks(range(len(names) + 1), [*names, "MEAN RANK"], rotation=60, ha="right",
                  fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.axvline(len(names) - 0.5, color="white", lw=2)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{M[i, j]:.1f}" if j == len(names) else f"{M[i, j]:g}",
                    ha="center", va="center", fontsize=6,
                    color="white" if M[i, j] > 0.6 * len(rows) else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="rank (1 = best)")
    return fig
