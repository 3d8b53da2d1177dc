"""The qualitative grid: a fixed set of val images, their ground truth and each model's prediction.

Rows are images (evenly spaced over the val split, so every report of a dataset shows the same
ones); columns are the image, then per task its ground truth and every model's prediction:

* segmentation: labels in one fixed palette (class ``k`` always has the same colour, unlabelled
  pixels are black), with a legend of the class names when the dataset gives them;
* depth: ground truth and predictions on one colour scale, then the absolute error |p − t| on
  valid pixels (missing ground truth is grey), each with a colour bar;
* normals: unit vectors as RGB ((n + 1) / 2; missing is black), then the angular error in
  degrees with a colour bar;
* edges: the edge map and the predicted edge probability;
* image-level tasks (classification): the true and predicted class as text.

The drawing of a task is chosen by its kind (the :class:`~mtlcv.tasks.base.Task` subclass), never
by its name; a task of an unknown kind is drawn from its shape when it is dense and skipped
otherwise; a task whose targets are not images (detection boxes) has no column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..tasks.base import Task
from ..tasks.depth import Depth
from ..tasks.edges import Edges
from ..tasks.normals import Normals, angles_deg
from ..tasks.segmentation import Segmentation


@dataclass
class Samples:
    """A model's predictions on fixed val images, with the images and their targets."""

    images: torch.Tensor  # [K, 3, H, W] in [0, 1]
    targets: dict[str, torch.Tensor]
    preds: dict[str, torch.Tensor]  # raw head outputs
    tasks: dict[str, Task]
    class_names: dict[str, Sequence[str]] = field(default_factory=dict)
    indices: list[int] = field(default_factory=list)


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def predict_run(run: str | Path, k: int = 4, overrides: Sequence[str] = ()) -> Samples:
    """Load ``run``'s best checkpoint (else its last) and predict ``k`` fixed val images on CPU."""
    from ..config import load
    from ..data.base import collate
    from ..engine.checkpoint import load_checkpoint
    from ..engine.experiment import build
    from ..errors import CheckpointError

    run = Path(run)
    cfg = load(run / "config.yaml", ["train.device=cpu", *overrides])
    exp = build(cfg, splits=("val",))
    ckpt_path = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
    if not ckpt_path.is_file():
        raise CheckpointError(f"{str(run)!r} has no checkpoint (best.pt or last.pt) yet")
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    exp.model.load_state_dict(ckpt["model"])
    exp.model.eval()
    ds = exp.datasets["val"]
    idx = sample_indices(len(ds), k)
    items = [ds[i] for i in idx]
    batch = collate(items)
    with torch.no_grad():
        preds = exp.model(batch["image"])
    names = getattr(ds, "class_names", {}) or {}
    return Samples(
        images=batch["image"],
        targets={t: batch[t] for t in exp.tasks},
        preds={t: preds[t].detach() for t in exp.tasks},
        tasks=dict(exp.tasks),
        class_names={t: list(names[t]) for t in exp.tasks if t in names},
        indices=idx,
    )


def palette(n: int) -> np.ndarray:
    """``n`` fixed RGB colours in [0, 1] (tab20, then golden-ratio hues)."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb

    base = [colormaps["tab20"](i)[:3] for i in range(20)]
    extra = [hsv_to_rgb(((i * 0.618034) % 1.0, 0.65, 0.9)) for i in range(max(0, n - 20))]
    return np.array((base + [tuple(c) for c in extra])[:n], dtype=float)


def _labels_rgb(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    out = np.zeros((*labels.shape, 3))
    ok = (labels >= 0) & (labels < len(colours))
    out[ok] = colours[labels[ok]]
    return out


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


@dataclass
class _Column:
    title: str
    draw: Any  # (ax, row) -> image artist or None
    bar: str | None = None  # colour bar group


def _columns(task_name: str, task: Task, gt: torch.Tensor, runs: Mapping[str, torch.Tensor],
             class_names: Sequence[str] | None) -> tuple[list[_Column], dict[str, Any]]:
    """The columns of one task: ground truth, then per run its prediction (and error)."""
    cols: list[_Column] = []
    bars: dict[str, Any] = {}
    one = len(runs) == 1

    def name(label: str) -> str:
        return f"{task_name} pred" if one else f"{task_name} {label}"

    if isinstance(task, Segmentation):
        colours = palette(task.num_classes)
        g = gt.numpy().astype(int)
        cols.append(_Column(f"{task_name} GT", lambda ax, r: ax.imshow(_labels_rgb(g[r],
                                                                                   colours))))
        for label, p in runs.items():
            lab = task.postprocess(p).numpy().astype(int)
            cols.append(_Column(name(label), lambda ax, r, lab=lab: ax.imshow(
                _labels_rgb(lab[r], colours))))
        names = list(class_names or [f"class {c}" for c in range(task.num_classes)])
        bars["legend"] = (colours, names)
        return cols, bars
    if isinstance(task, Depth) or (task.dense and task.channels == 1
                                   and not isinstance(task, Edges)):
        g = gt[:, 0].numpy().astype(float)
        valid = g > 0
        vals = g[valid] if valid.any() else np.zeros(1)
        lo, hi = np.percentile(vals, 1), np.percentile(vals, 99)
        gm = np.ma.masked_where(~valid, g)
        cols.append(_Column(f"{task_name} GT", lambda ax, r: ax.imshow(
            gm[r], cmap=_cmap("viridis"), vmin=lo, vmax=hi), bar=f"{task_name} (m)"))
        errs = {}
        for label, p in runs.items():
            pv = task.postprocess(p)[:, 0].numpy().astype(float)
            cols.append(_Column(name(label), lambda ax, r, pv=pv: ax.imshow(
                pv[r], cmap=_cmap("viridis"), vmin=lo, vmax=hi), bar=f"{task_name} (m)"))
            errs[label] = np.ma.masked_where(~valid, np.abs(pv - g))
        emax = max(float(np.percentile(e.compressed(), 99)) if e.count() else 1.0
                   for e in errs.values()) or 1.0
        for label, e in errs.items():
            cols.append(_Column(f"{task_name} |err|" + ("" if one else f" {label}"),
                                lambda ax, r, e=e: ax.imshow(e[r], cmap=_cmap("inferno"),
                                                             vmin=0, vmax=emax),
                                bar=f"{task_name} |error| (m)"))
        return cols, bars
    if isinstance(task, Normals) or (task.dense and task.channels == 3):
        valid = gt.norm(dim=1) > 0
        g = ((gt.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1) * valid[..., None].numpy()
        cols.append(_Column(f"{task_name} GT", lambda ax, r: ax.imshow(g[r])))
        errs = {}
        for label, p in runs.items():
            unit = task.postprocess(p)
            pv = ((unit.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
            cols.append(_Column(name(label), lambda ax, r, pv=pv: ax.imshow(pv[r])))
            errs[label] = np.ma.masked_where(~valid.numpy(), angles_deg(unit, gt).numpy())
        for label, e in errs.items():
            cols.append(_Column(f"{task_name} angle err" + ("" if one else f" {label}"),
                                lambda ax, r, e=e: ax.imshow(e[r], cmap=_cmap("inferno"),
                                                             vmin=0, vmax=60),
                                bar=f"{task_name} angular error (°)"))
        return cols, bars
    if isinstance(task, Edges):
        g = np.ma.masked_where(gt[:, 0].numpy() == 255, gt[:, 0].numpy().astype(float))
        cols.append(_Column(f"{task_name} GT", lambda ax, r: ax.imshow(
            g[r], cmap=_cmap("gray_r"), vmin=0, vmax=1)))
        for label, p in runs.items():
            prob = torch.sigmoid(p[:, 0]).numpy()
            cols.append(_Column(name(label), lambda ax, r, prob=prob: ax.imshow(
                prob[r], cmap=_cmap("gray_r"), vmin=0, vmax=1), bar=f"{task_name} probability"))
        return cols, bars
    if not task.dense:
        names = list(class_names or [])

        def cls(v: int) -> str:
            if v == 255:
                return "(none)"
            return names[v] if 0 <= v < len(names) else f"class {v}"

        g = gt.numpy().astype(int)
        preds = {label: task.postprocess(p).numpy().astype(int) for label, p in runs.items()}

        def text(ax: Any, r: int) -> None:
            lines = [f"GT: {cls(g[r])}"]
            for label, pv in preds.items():
                ok = "✓" if pv[r] == g[r] else "✗"
                lines.append(f"{'pred' if one else label}: {cls(pv[r])} {ok}")
            ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)

        cols.append(_Column(task_name, text))
        return cols, bars
    return [], {}


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    cm = colormaps[name].copy()
    cm = cm.with_extremes(bad="0.6")  # missing ground truth
    return cm


def qualitative_figure(samples: Mapping[str, Samples]) -> Figure:
    """Image | ground truth | prediction(s) for every task, one row per image.

    ``samples`` maps a model's label to its :class:`Samples`; all must show the same images
    (the ground truth is taken from the first).
    """
    first = next(iter(samples.values()))
    K = first.images.shape[0]
    columns: list[_Column] = [_Column("image", lambda ax, r: ax.imshow(
        first.images[r].permute(1, 2, 0).clamp(0, 1).numpy()))]
    legends = []
    for t, task in first.tasks.items():
        if not isinstance(first.targets[t], torch.Tensor):
            continue  # not an image-shaped target (detection boxes): no column
        runs = {label: s.preds[t] for label, s in samples.items()}
        cols, extra = _columns(t, task, first.targets[t], runs, first.class_names.get(t))
        columns += cols
        if "legend" in extra:
            legends.append((t, *extra["legend"]))
    h, w = first.images.shape[-2:]
    cell = 1.45
    fig = Figure(figsize=(cell * len(columns) * max(1.0, w / h) * 0.85, cell * K + 1.3),
                 layout="constrained")
    axes = fig.subplots(K, len(columns), squeeze=False)
    groups: dict[str, list[Any]] = {}
    artists: dict[str, Any] = {}
    for c, col in enumerate(columns):
        for r in range(K):
            ax = axes[r, c]
            art = col.draw(ax, r)
            _off(ax)
            if r == 0:
                ax.set_title(col.title, fontsize=7)
            if col.bar is not None:
                groups.setdefault(col.bar, []).append(ax)
                if art is not None:
                    artists[col.bar] = art
        if c == 0:
            for r in range(K):
                axes[r, 0].set_ylabel(f"val #{first.indices[r]}" if first.indices else "",
                                      fontsize=7)
    for label, axs in groups.items():
        if label in artists:
            cb = fig.colorbar(artists[label], ax=axs, location="bottom", shrink=0.9,
                              aspect=30, pad=0.01)
            cb.set_label(label, fontsize=7)
            cb.ax.tick_params(labelsize=6)
    for task_name, colours, names in legends:
        from matplotlib.patches import Patch

        handles = [Patch(color=colours[i], label=n) for i, n in enumerate(names)]
        handles.append(Patch(color="black", label="unlabelled"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(8, len(handles)),
                   fontsize=7, frameon=False, title=f"{task_name} classes",
                   title_fontsize=7)
    return fig
