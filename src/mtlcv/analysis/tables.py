"""Comparison tables of runs: per-task test metrics side by side, with Δm against a baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from .delta_m import delta_m, main_metrics


def aux_tasks(results: Mapping[str, Any]) -> list[str]:
    """The auxiliary tasks of a results dict (``results.json``); none for older runs."""
    return list(results.get("aux_tasks") or [])


def metric_directions(results: Mapping[str, Any]) -> dict[str, dict[str, bool]]:
    """``{task: {metric: higher_is_better}}`` of a results dict (``results.json``).

    Runs record the directions themselves (``higher_is_better``), so that tasks whose name is
    not a registered task kind (two ``classification`` tasks named ``left`` and ``right``) are
    tabulated too; results written before that are looked up by task name in the registry.
    """
    if "higher_is_better" in results:
        return {t: dict(ms) for t, ms in results["higher_is_better"].items()}
    from ..registry import TASKS

    return {t: dict(TASKS.create(t).higher_is_better) for t in results["test"]}


def comparison_table(
    runs: Mapping[str, Mapping[str, Any]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    baseline: str | None = None,
    title: str | None = None,
    aux: Sequence[str] = (),
) -> Table:
    """A rich table with one row per (task, metric) and one column per run.

    ``runs`` maps a column name to a results dict (``results.json``: ``{"test": {task: {metric:
    value}}}``). When ``baseline`` names one of the runs, every other run also gets its relative
    change per metric (signed so that positive is better) and a last row with Δm in convention
    (a): the mean over all metrics of the signed relative change, where lower is better.
    Auxiliary tasks (``aux``) come last, in a section of their own marked "(aux)", and are left
    out of Δm.
    """
    names = list(runs)
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
        if baseline is not None and n != baseline:
            table.add_column(f"vs {baseline}", justify="right")
    every: Sequence[str] = list(next(iter(runs.values()))["test"])
    tasks = [t for t in every if t not in aux] + [t for t in every if t in aux]
    for task in tasks:
        if task in aux and (task == tasks[0] or tasks[tasks.index(task) - 1] not in aux):
            table.add_section()
        for metric, higher in higher_is_better[task].items():
            arrow = "↑" if higher else "↓"
            row = [f"{task} (aux)" if task in aux else task, f"{metric} {arrow}"]
            base = runs[baseline]["test"][task][metric] if baseline is not None else None
            for n in names:
                value = runs[n]["test"][task][metric]
                row.append(f"{value:.4g}")
                if baseline is not None and n != baseline:
                    rel = 100.0 * (value - base) / base if base else float("nan")
                    rel = rel if higher else -rel
                    colour = "green" if rel > 0 else "red" if rel < 0 else ""
                    row.append(f"[{colour}]{rel:+.1f}%[/]" if colour else f"{rel:+.1f}%")
            table.add_row(*row)
    if baseline is not None:
        row = ["Δm", "(a) ↓"]
        for n in names:
            if n == baseline:
                row.append("0.00%")
            else:
                dm = delta_m(main_metrics(runs[n]["test"], aux),
                             main_metrics(runs[baseline]["test"], aux), higher_is_better)
                row.extend([f"{dm:+.2f}%", ""])
        table.add_section()
        table.add_row(*row)
    return table
