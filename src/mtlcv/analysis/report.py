"""``mtlcv report PATH``: a self-contained HTML page (and its PNG figures) for a run or a grid.

PATH is a run directory (``mtlcv train``) or a comparison grid (``mtlcv compare``). The report
goes to ``PATH/report/`` (or ``--out``): ``index.html`` with every figure embedded as a PNG data
URI (the page opens offline, from anywhere, and fetches nothing), and the same figures as PNG
files beside it. The page is plain HTML and CSS, no JavaScript.

A run's report shows its test metrics (and Δm against its baselines), training curves (train
loss and every val metric per task, Δm on val), the balancer's task weights over epochs, and,
when the run was trained with ``train.log_gradients_every``, the gradient conflict between
tasks and the TAG inter-task affinity (:mod:`mtlcv.analysis.interactions`), and a qualitative
grid of fixed val images (:mod:`mtlcv.analysis.qualitative`).

A grid's report shows the summary table ``mtlcv compare`` prints, a Pareto plot of two test
metrics, the rank of every variant on every metric, the curves with one line per variant (mean
over seeds, the band spanning the seeds), task weights, each variant's mean gradient cosine and
task affinity, and the qualitative grid of the baseline next to the variant with the best Δm.

Unfinished runs are reported as far as they got (curves of the epochs done; they are left out
of the tables until they have ``results.json``).
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import ConfigError, MtlcvError
from . import plots

_RUN_FILES = ("metrics.jsonl", "results.json")


@dataclass
class RunData:
    """What a run directory holds, read once."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    results: dict[str, Any] | None
    gradients: list[dict[str, Any]]

    @property
    def tasks(self) -> list[str]:
        return list(self.config.get("tasks") or [])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError(f"{str(path)!r} line {k} is not valid JSON; the file is "
                              "damaged") from None
    return out


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / f).is_file() for f in _RUN_FILES)


def load_run(path: str | Path) -> RunData:
    """Read a run directory (config, metrics.jsonl, results.json, gradients.jsonl)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{str(path)!r} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{str(path / 'config.yaml')!r} is not valid YAML") from None
    results = None
    if (path / "results.json").is_file():
        try:
            results = json.loads((path / "results.json").read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{str(path / 'results.json')!r} is not valid JSON") from None
    return RunData(path, config, _read_jsonl(path / "metrics.jsonl"), results,
                   _read_jsonl(path / "gradients.jsonl"))


def directions(runs: Sequence[RunData]) -> dict[str, dict[str, bool]]:
    """``{task: {metric: higher_is_better}}`` from the first finished run (results.json), else
    from the registered task kinds of the run's task names."""
    from .tables import metric_directions

    for r in runs:
        if r.results is not None:
            return metric_directions(r.results)
    for r in runs:
        if r.history:
            try:
                return metric_directions({"test": r.history[-1]["val"]})
            except MtlcvError:
                raise ConfigError(
                    f"{str(r.path)!r} has no results.json yet and its tasks are not registered "
                    "task kinds; the metric directions are unknown until the run finishes"
                ) from None
    raise ConfigError("no run has finished an epoch yet; nothing to report")


# ---------------------------------------------------------------------- grids
@dataclass
class GridData:
    path: Path
    labels: list[str]
    overrides: dict[str, list[str]]
    baseline: str | None
    runs: dict[str, dict[int, RunData]] = field(default_factory=dict)


def is_grid(path: Path) -> bool:
    return (path / "grid.json").is_file() or any(path.glob("*/seed*/config.yaml"))


def load_grid(path: str | Path, only: Sequence[str] | None = None) -> GridData:
    """Read a ``mtlcv compare`` directory: its plan (``grid.json``) and every run in it."""
    path = Path(path)
    manifest = path / "grid.json"
    if manifest.is_file():
        try:
            plan = json.loads(manifest.read_text())
            labels = [v["label"] for v in plan["variants"]]
            overrides = {v["label"]: list(v["overrides"]) for v in plan["variants"]}
            baseline = plan.get("baseline")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{str(manifest)!r} is not a grid plan written by mtlcv compare; "
                              "remove it to report the runs found") from None
    else:  # a grid from before grid.json: its variant folders, without a known baseline
        labels = sorted({p.parent.parent.name for p in path.glob("*/seed*/config.yaml")})
        overrides = {label: [] for label in labels}
        baseline = None
    if only:
        unknown = [v for v in only if v not in labels]
        if unknown:
            raise ConfigError(f"--variants: {', '.join(unknown)} not in the grid; it has "
                              f"{', '.join(labels)}")
        keep = set(only) | ({baseline} if baseline else set())
        labels = [v for v in labels if v in keep]
    grid = GridData(path, labels, overrides, baseline)
    for label in labels:
        seeds = {}
        for run in sorted((path / label).glob("seed*")):
            if run.is_dir() and (run / "config.yaml").is_file() and run.name[4:].isdigit():
                seeds[int(run.name[4:])] = load_run(run)
        if seeds:
            grid.runs[label] = dict(sorted(seeds.items()))
    if not grid.runs:
        raise ConfigError(f"{str(path)!r} holds no runs yet")
    return grid


def grid_rows(grid: GridData, higher: dict[str, dict[str, bool]]) -> list[dict[str, Any]]:
    """The rows ``mtlcv compare`` prints (:func:`mtlcv.engine.grid.summarise`), from the
    finished runs on disk."""
    from ..engine.grid import Variant, summarise

    vs = []
    base_v = None
    for label in grid.labels:
        done = {s: r.results for s, r in grid.runs.get(label, {}).items() if r.results}
        if not done:
            continue
        v = Variant(label, grid.overrides.get(label, []), dict(done))
        vs.append(v)
        if label == grid.baseline:
            base_v = v
    return summarise(vs, base_v, higher) if vs else []


# ---------------------------------------------------------------------- HTML
CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1400px; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
p.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #eef7ee; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.88em; margin-top: 0.3em; max-width: 70em; }
.note { color: #555; font-style: italic; }
details pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
nav a { margin-right: 1em; }
"""


class Page:
    """Sections of HTML; figures are saved as PNG beside the page and embedded as data URIs."""

    def __init__(self, out: Path, title: str) -> None:
        self.out = out
        self.title = title
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.pngs: list[Path] = []

    def section(self, title: str) -> None:
        anchor = "s" + str(len(self.toc))
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def text(self, text: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.parts.append(f"<p{attr}>{html.escape(text)}</p>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig: Any, name: str, caption: str) -> None:
        path = plots.save(fig, self.out / f"{name}.png")
        self.pngs.append(path)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def write(self, meta: str) -> Path:
        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.toc)
        page = (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1><p class=\"meta\">{html.escape(meta)}</p>"
            f"<nav>{nav}</nav>" + "\n".join(self.parts) + "</body></html>\n"
        )
        path = self.out / "index.html"
        path.write_text(page, encoding="utf-8")
        return path


def _table(head: Sequence[str], rows: Sequence[Sequence[str]],
           best: Sequence[set[int]] | None = None) -> str:
    """An HTML table; ``best[c]`` holds the row indices to mark in column ``c``."""
    out = ["<table><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        out.append("<tr>")
        for c, cell in enumerate(row):
            mark = best is not None and c < len(best) and i in best[c]
            attr = ' class="best"' if mark else ""
            out.append(f"<td{attr}>{html.escape(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


# ---------------------------------------------------------------------- sections
def _gradient_sections(page: Page, run: RunData, tasks: list[str], prefix: str = "") -> None:
    page.section("Gradient conflict")
    if not run.gradients:
        page.text("Not logged: train with --set train.log_gradients_every=N to log the cosine "
                  "similarity of the per-task gradients every N steps (see docs/analysis.md).",
                  "note")
        page.section("Inter-task affinity (TAG)")
        page.text("Not logged (same switch, train.log_gradients_every).", "note")
        return
    rec = run.gradients
    shared = rec[0]["shared_parameters"]
    page.figure(plots.conflict_figure(rec, tasks), f"{prefix}gradient_conflict",
                f"Cosine similarity of the per-task gradients of the {shared:,}"
                f" shared parameters on the training batch, every "
                f"{_every(rec)} steps ({len(rec)} logged). Negative: the tasks pull the shared "
                "weights in conflicting directions (Yu et al. 2020).")
    page.section("Inter-task affinity (TAG)")
    page.figure(plots.affinity_figure(rec, tasks), f"{prefix}task_affinity",
                "Lookahead affinity of Fifty et al. (NeurIPS 2021, Eq. 2): Z_{i→j} = 1 − "
                "L_j(θ_s − η∇L_i) / L_j(θ_s) on the same batch, divided by the step size η "
                "(the scale of the authors' code; sign and order are those of Z). Row i, "
                "column j: a step on task i's loss alone lowers (> 0) or raises (< 0) task j's "
                "loss. Matrices: mean over equal spans of training.")


def _every(records: Sequence[dict[str, Any]]) -> str:
    if len(records) < 2:
        return "N"
    steps = [b["global_step"] - a["global_step"] for a, b in zip(records, records[1:])]
    return str(min(steps))


def _run_table(results: dict[str, Any], higher: dict[str, dict[str, bool]]) -> str:
    rows = []
    base = None
    if "baselines" in results:
        from ..engine.experiment import load_baselines

        try:
            base = load_baselines(results["baselines"])["test"]
        except MtlcvError:
            base = None
    for t, ms in higher.items():
        for m, hib in ms.items():
            v = results["test"][t][m]
            row = [f"{t} {m} {'↑' if hib else '↓'}", _fmt(v)]
            if base is not None:
                b = base.get(t, {}).get(m)
                if b:
                    rel = 100.0 * (v - b) / b * (1 if hib else -1)
                    row += [_fmt(b), f"{rel:+.1f}%"]
                else:
                    row += ["—", ""]
            rows.append(row)
    head = ["metric", "test"] + (["baseline", "vs baseline (+ = better)"] if base else [])
    return _table(head, rows)


def _qualitative(page: Page, runs: dict[str, Path], images: int, overrides: Sequence[str],
                 log: Callable[[str], None], caption: str) -> None:
    from .qualitative import predict_run, qualitative_figure

    page.section("Predictions on val images")
    try:
        samples = {label: predict_run(p, images, overrides) for label, p in runs.items()}
    except MtlcvError as exc:
        page.text(f"Skipped: {exc}. Point the report at the data with --set data.root=PATH.",
                  "note")
        log(f"report: qualitative grid skipped ({exc})")
        return
    first = next(iter(samples.values()))
    same = all(s.images.shape == first.images.shape and bool((s.images == first.images).all())
               for s in samples.values())
    groups = [samples] if same else [{k: v} for k, v in samples.items()]
    for k, group in enumerate(groups):
        page.figure(qualitative_figure(group), f"qualitative{'' if same else f'_{k}'}",
                    caption + ("" if same else f" ({next(iter(group))})"))


def run_report(run_dir: Path, out: Path, images: int = 4, qualitative: bool = True,
               overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> Path:
    run = load_run(run_dir)
    if not run.history:
        raise ConfigError(f"{str(run_dir)!r} has no finished epoch yet; nothing to report")
    higher = directions([run])
    tasks = run.tasks
    res = run.results
    title = f"mtlcv report: {run.config.get('name', run_dir.name)}"
    page = Page(out, title)
    cfg_m = run.config.get("model", {})
    meta = (f"{run_dir} · arch {cfg_m.get('arch')} · backbone "
            f"{(cfg_m.get('backbone') or {}).get('name')} · balancer "
            f"{(run.config.get('balancer') or {}).get('name')} · tasks {', '.join(tasks)} · "
            f"{len(run.history)}/{(run.config.get('train') or {}).get('epochs')} epochs")
    page.section("Test metrics")
    if res is None:
        page.text("The run has not finished: no test metrics yet (curves below show the epochs "
                  "done).", "note")
    else:
        page.raw(_run_table(res, higher))
        facts = [f"best epoch {res['best_epoch']} of {res['epochs']} (selected by "
                 f"{res['selection'].replace('_', ' ')} on val)",
                 f"{res['parameters']:,} parameters",
                 f"training step {res['step_time_s']:.3f} s",
                 f"wall time {res['wall_time_s']:.0f} s",
                 f"device {res.get('device')}"]
        if "delta_m" in res:
            facts.insert(0, f"Δm vs {res['baselines']}: {res['delta_m']['test']:+.2f}% on test "
                            "(lower is better)")
        page.text("; ".join(facts) + ".")
    series = {"run": [run.history]}
    page.section("Training curves")
    page.figure(plots.curves_figure(series, higher), "curves",
                "Training loss (mean over the epoch's steps) and every val metric per epoch.")
    dm = plots.delta_m_figure(series)
    if dm is not None:
        page.figure(dm, "delta_m", "Δm on val against the baselines per epoch (convention "
                    "(a): mean relative change over all metrics, lower is better).")
    page.section("Task weights")
    wf = plots.weights_figure(series, tasks)
    if wf is None:
        page.text("This balancer logs no task weights.", "note")
    else:
        page.figure(wf, "task_weights", "The balancer's weight of every task (mean over the "
                    "epoch's steps).")
    _gradient_sections(page, run, tasks)
    if qualitative:
        _qualitative(page, {"run": run_dir}, images, overrides, log,
                     "Fixed val images: input, ground truth and prediction of the checkpoint "
                     "selected on val (best.pt).")
    page.section("Configuration")
    page.raw("<details><summary>config.yaml</summary><pre>"
             + html.escape(yaml.safe_dump(run.config, sort_keys=False)) + "</pre></details>")
    return page.write(meta + f" · written {time.strftime('%Y-%m-%d %H:%M')}")


#: two-sided 95 % quantiles of Student's t by degrees of freedom (seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (table; conservative
    between entries, 1.96 beyond 30)."""
    if df < 1:
        return math.inf
    if df > 30:
        return 1.96
    return T95[max(d for d in T95 if d <= df)]


def noise_rows(rows: Sequence[dict[str, Any]], grid: GridData,
               higher: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Per variant: is its Δm against the baseline beyond seed noise? A one-sample t-test of
    the per-seed Δm values against 0 at 95 % (two-sided)."""
    from . import delta_m

    base = [r.results["test"] for r in grid.runs.get(grid.baseline or "", {}).values()
            if r.results]
    if not base:
        return []
    from ..engine.grid import _mean_metrics

    base_mean = _mean_metrics(base)
    out = []
    for row in rows:
        if row["label"] == grid.baseline or "delta_m" not in row:
            continue
        dms = [delta_m(r.results["test"], base_mean, higher)
               for r in grid.runs[row["label"]].values() if r.results]
        n = len(dms)
        if n < 2:
            out.append([row["label"], f"{dms[0]:+.2f}", "—", "1", "—", "one seed: unknown"])
            continue
        mean, sd = statistics.mean(dms), statistics.stdev(dms)
        t = mean / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, mean or 1)
        crit = t95(n - 1)
        verdict = ("better than the baseline" if t < -crit else
                   "worse than the baseline" if t > crit else "within seed noise")
        out.append([row["label"], f"{mean:+.2f}", f"{sd:.2f}", str(n), f"{t:+.2f}", verdict])
    return out


def _parse_metric(text: str, higher: dict[str, dict[str, bool]]) -> tuple[str, str]:
    task, _, metric = text.partition(".")
    if task not in higher or metric not in higher[task]:
        valid = ", ".join(f"{t}.{m}" for t, ms in higher.items() for m in ms)
        raise ConfigError(f"--pareto: {text!r} is not a metric of this grid; valid: {valid}")
    return task, metric


def grid_report(grid_dir: Path, out: Path, pareto: Sequence[str] | None = None,
                only: Sequence[str] | None = None, images: int = 4, qualitative: bool = True,
                overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> Path:
    from ..engine.grid import _cells, _columns

    grid = load_grid(grid_dir, only)
    all_runs = [r for seeds in grid.runs.values() for r in seeds.values()]
    higher = directions(all_runs)
    tasks = next(r.tasks for r in all_runs)
    rows = grid_rows(grid, higher)
    page = Page(out, f"mtlcv report: grid {grid_dir.name}")
    planned = len(grid.labels)
    n_runs = len(all_runs)
    n_done = sum(r.results is not None for r in all_runs)
    seeds = sorted({s for v in grid.runs.values() for s in v})
    meta = (f"{grid_dir} · {planned} variants · seeds {', '.join(map(str, seeds))} · "
            f"{n_done}/{n_runs} runs finished"
            + (f" · Δm vs {grid.baseline}" if grid.baseline else ""))

    page.section("Summary")
    if rows:
        cols = _columns(higher, rows)  # (main tasks, auxiliary tasks shown apart)
        main_cols, aux_cols = cols
        has_dm = any("delta_m" in r for r in rows)

        def arrow(t: str, m: str) -> str:
            return "↑" if higher[t][m] else "↓"

        head = ["run"] + [f"{t} {m} {arrow(t, m)}" for t, m in main_cols]
        head += ["Δm % ↓"] if has_dm else []
        head += [f"{t} (aux) {m} {arrow(t, m)}" for t, m in aux_cols] + ["params", "step s"]

        def best_of(t: str, m: str) -> set[int]:
            vals = [r["test"].get(t, {}).get(m, math.nan) for r in rows]
            finite = [v for v in vals if isinstance(v, float) and not math.isnan(v)]
            target = (max if higher[t][m] else min)(finite) if finite else None
            return {i for i, v in enumerate(vals) if v == target}

        best: list[set[int]] = [set()] + [best_of(t, m) for t, m in main_cols]
        if has_dm:
            dms = [r.get("delta_m", math.inf) for r in rows]
            best.append({int(np.argmin(dms))})
        best += [best_of(t, m) for t, m in aux_cols]
        page.raw(_table(head, [_cells(r, cols, has_dm) for r in rows], best))
        page.text("Test split, mean over seeds; Δm (convention (a), lower is better) of each "
                  "seed's run against the baseline's mean over seeds, mean ± std over seeds; "
                  "bold: best in its column. The same table as mtlcv compare prints and "
                  "summary.md keeps.")
    else:
        page.text("No run has finished yet.", "note")
    noise = noise_rows(rows, grid, higher)
    if any(r[3] != "1" for r in noise):  # with one seed per variant there is no noise estimate
        page.section("Δm against seed noise")
        page.raw(_table(["run", "Δm % (mean)", "std", "seeds", "t", "verdict (95 %)"], noise))
        page.text(f"A one-sample t-test of each variant's per-seed Δm against 0 (two-sided, 95 %; "
                  f"|t| above {t95(max(2, len(seeds)) - 1):.2f} with {len(seeds)} seeds). It "
                  "treats the baseline's mean over seeds as exact, so it slightly overstates "
                  "the evidence; with few seeds only large differences pass.")
    keys = [(t, m) for t, ms in higher.items() for m in ms]
    if len(rows) >= 2 and len(keys) >= 2:
        if pareto:
            a, b = (_parse_metric(x, higher) for x in pareto)
        else:  # the first metric of the first two tasks (of the one task when there is one)
            firsts = [(t, next(iter(ms))) for t, ms in higher.items() if ms]
            a, b = (firsts[0], firsts[1]) if len(firsts) > 1 else (keys[0], keys[1])
        spread = {}
        for label, seeds_ in grid.runs.items():
            res = [r.results["test"] for r in seeds_.values() if r.results]
            if len(res) > 1:
                spread[label] = (statistics.stdev(x[a[0]][a[1]] for x in res),
                                 statistics.stdev(x[b[0]][b[1]] for x in res))
        page.section("Pareto front")
        page.figure(plots.pareto_figure(rows, a, b, higher, spread), "pareto",
                    f"Mean test {a[0]} {a[1]} against {b[0]} {b[1]} per variant (bars: std over "
                    "seeds); red: no other variant is better on both. Choose the metrics with "
                    "--pareto TASK.METRIC,TASK.METRIC.")
        page.section("Ranks")
        page.figure(plots.rank_figure(rows, higher), "ranks",
                    "Rank of every variant on every mean test metric (1 = best, ties share "
                    "the mean rank), sorted by the mean rank over all metrics.")
    series = {label: [r.history for r in seeds_.values() if r.history]
              for label, seeds_ in grid.runs.items()}
    series = {k: v for k, v in series.items() if v}
    page.section("Training curves")
    page.figure(plots.curves_figure(series, higher), "curves",
                "Training loss and every val metric per epoch: mean over seeds (line) and the "
                "lowest to highest seed (band).")
    dm = plots.delta_m_figure(series)
    if dm is not None:
        page.figure(dm, "delta_m", "Δm on val against the baseline run of the same seed per "
                    "epoch (the criterion that selects each run's best epoch).")
    page.section("Task weights")
    wf = plots.weights_figure(series, tasks, skip_constant=True)
    if wf is None:
        page.text("No balancer in this grid changes its task weights.", "note")
    else:
        page.figure(wf, "task_weights", "Each variant's task weights per epoch (mean over the "
                    "epoch's steps; line: mean over seeds, band: seed range). Variants whose "
                    "weights never change (fixed weights) are left out.")
    cos, aff = {}, {}
    for label, seeds_ in grid.runs.items():
        recs = [g for r in seeds_.values() for g in r.gradients]
        if recs:
            with np.errstate(all="ignore"):
                cos[label] = np.nanmean(plots._matrix(recs, "cosine"), axis=0)
                aff[label] = np.nanmean(plots._matrix(recs, "affinity", True), axis=0)
    page.section("Gradient conflict and task affinity")
    if cos:
        page.figure(plots.matrices_figure(cos, tasks, "mean gradient cosine (< 0: conflict)",
                                          1.0), "gradient_conflict",
                    "Per variant, the cosine of the per-task gradients of the shared parameters, "
                    "mean over logged steps and seeds.")
        page.figure(plots.matrices_figure(aff, tasks, "mean affinity Z_{i→j} / lr (> 0: i "
                                          "helps j)", fmt=".2g", offdiag=True), "task_affinity",
                    "Per variant, TAG's lookahead affinity (row: the task stepped on, column: "
                    "the loss measured), mean over logged steps and seeds. Variants without "
                    "shared parameters (single-task, soft sharing by a penalty) have none.")
    else:
        page.text("Not logged: add --set train.log_gradients_every=N to the compare command.",
                  "note")
    if qualitative and rows:
        pick = []
        if grid.baseline and any(r["label"] == grid.baseline for r in rows):
            pick.append(grid.baseline)
        with_dm = [r for r in rows if r["label"] != grid.baseline and "delta_m" in r]
        if with_dm:
            pick.append(min(with_dm, key=lambda r: r["delta_m"])["label"])
        for r in rows:
            if len(pick) >= 2:
                break
            if r["label"] not in pick:
                pick.append(r["label"])
        paths = {}
        for label in pick:
            finished = [r for r in grid.runs[label].values() if r.results]
            paths[label] = finished[0].path
        _qualitative(page, paths, images, overrides, log,
                     "Fixed val images: ground truth and the predictions of "
                     + " and ".join(f"{k} ({p.name})" for k, p in paths.items())
                     + " (the baseline and the variant with the best Δm).")
    return page.write(meta + f" · written {time.strftime('%Y-%m-%d %H:%M')}")


def build_report(
    path: str | Path,
    out: str | Path | None = None,
    pareto: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    images: int = 4,
    qualitative: bool = True,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Path:
    """Write the report of the run or grid at ``path``; return the path of ``index.html``."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"report: {str(path)!r} is not a directory")
    out_dir = Path(out) if out is not None else path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    if pareto is not None and len(pareto) != 2:
        raise ConfigError(f"--pareto: expected two metrics TASK.METRIC,TASK.METRIC, got "
                          f"{','.join(pareto)!r}")
    if is_run(path):
        if pareto or variants:
            raise ConfigError("--pareto and --variants are for a grid; PATH is a single run")
        return run_report(path, out_dir, images, qualitative, overrides, log)
    if is_grid(path):
        return grid_report(path, out_dir, pareto, variants, images, qualitative, overrides, log)
    raise ConfigError(f"report: {str(path)!r} is neither a run directory (config.yaml with "
                      "metrics.jsonl) nor a grid made by mtlcv compare (grid.json)")
