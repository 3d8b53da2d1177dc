"""Comparison grids: one base config × a set of variations × seeds, trained and summarised.

``mtlcv compare --config BASE --vary model.arch=stl,hps,mtan --seeds 0,1 --baseline
model.arch=stl --out DIR`` trains every combination into ``DIR/<label>/seed<s>`` (finished runs
are reused, interrupted ones resumed), then prints one row per combination: per-task test
metrics (mean over seeds), Δm against the baseline combination (mean ± std over seeds, each
seed's run against the baseline's mean over seeds), parameters and training step time.

Runs of the baseline are trained first; every other run of seed ``s`` selects its best epoch by
Δm on val against the baseline run of seed ``s``. The baseline is the combination that has the
``--baseline KEY=VALUE`` override, or, when no combination has it, one more run: the base
config with that override (e.g. ``--vary balancer.name=fixed,pcgrad --baseline
model.arch=stl``).
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis import delta_m, main_metrics
from ..config import ExperimentConfig, apply_overrides, from_dict, load, to_dict
from ..errors import ConfigError, MtlcvError
from .runlock import RunLock


@dataclass
class Variant:
    label: str
    overrides: list[str]
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)


def parse_vary(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["model.arch=stl,hps"]`` -> ``[("model.arch", ["stl", "hps"])]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--vary {item!r}: expected KEY=V1,V2,..., e.g. model.arch=stl,hps")
        key, values = item.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not key.strip() or not vals:
            raise ConfigError(f"--vary {item!r}: expected KEY=V1,V2,..., e.g. model.arch=stl,hps")
        out.append((key.strip(), vals))
    return out


def safe_label(value: str) -> str:
    """A folder name for a varied value: path separators and other characters that are not
    letters, digits, ``.``, ``_`` or ``-`` become ``_`` and leading dots are dropped, so that
    ``--vary data.root=/data/a`` names ``data_a`` inside ``--out`` and never a path outside it."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", value).lstrip("._").rstrip("_")
    return text or "_"


def variants(vary: Sequence[tuple[str, list[str]]]) -> list[Variant]:
    """Every combination of the varied values, labelled by its values joined with '-'."""
    keys = [k for k, _ in vary]
    combos = itertools.product(*[vals for _, vals in vary]) if vary else [()]
    out = [
        Variant("-".join(safe_label(v) for v in c) or "base", [f"{k}={v}" for k, v in zip(keys, c)])
        for c in combos
    ]
    seen: dict[str, Variant] = {}
    for v in out:
        if v.label in seen:
            raise ConfigError(
                f"--vary: {' '.join(seen[v.label].overrides)} and {' '.join(v.overrides)} would "
                f"both be written to the folder {v.label!r}; use values that differ in letters "
                "or digits"
            )
        seen[v.label] = v
    return out


def check_variant(cfg: ExperimentConfig, label: str) -> None:
    """Build ``cfg``'s tasks, model and balancer (not its training): a wrong component name or
    option stops ``compare`` before any run trains, naming the variant."""
    from .experiment import build_balancer, build_dataset, build_model, build_tasks

    try:
        ds = build_dataset(cfg, "train")
        build_model(cfg, build_tasks(cfg, ds))
        build_balancer(cfg)
    except MtlcvError as exc:
        raise type(exc)(f"variant {label!r}: {exc}") from None


def _finished(run: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    res, saved = run / "results.json", run / "config.yaml"
    if not (res.is_file() and saved.is_file()):
        return None
    with RunLock(run, "mtlcv compare"):  # a run another process still writes is not reused
        if to_dict(load(saved)) != to_dict(cfg):
            raise ConfigError(
                f"{str(run)!r} holds a finished run with other settings; choose another --out"
            )
        try:
            return json.loads(res.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{str(res)!r} is unreadable ({type(exc).__name__}); delete it to train the run "
                "again"
            ) from None


def run_grid(
    base: dict[str, Any],
    vary: Sequence[tuple[str, list[str]]],
    seeds: Sequence[int],
    out: str | Path,
    baseline: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[Variant], Variant | None]:
    """Train every variant × seed (baseline first); return the variants with their results."""
    from .trainer import train

    out = Path(out)
    vs = variants(vary)
    base_v = None
    if baseline is not None:
        if "=" not in baseline:
            raise ConfigError(f"--baseline {baseline!r}: expected KEY=VALUE, e.g. model.arch=stl")
        matches = [v for v in vs if baseline in v.overrides]
        if len(matches) > 1:
            raise ConfigError(
                f"--baseline {baseline!r} matches {len(matches)} combinations "
                f"({', '.join(v.label for v in matches)}); it must name one"
            )
        # a baseline outside the grid is one more run: the base config with that override
        base_v = matches[0] if matches else Variant(baseline.split("=", 1)[1], [baseline])
        vs = [base_v] + [v for v in vs if v is not base_v]
    total = len(vs) * len(seeds)
    # every run's config, checked before the first one trains (a typo must not cost hours)
    plan: list[tuple[Variant, int, ExperimentConfig, Path]] = []
    checked: set[str] = set()
    for v in vs:
        for seed in seeds:
            data = apply_overrides(base, [*v.overrides, f"seed={seed}"])
            data["name"] = f"{data.get('name', 'experiment')}-{v.label}-s{seed}"
            if base_v is not None and v is not base_v:
                data["baselines"] = str(out / base_v.label / f"seed{seed}")
            try:
                cfg = from_dict(data)
            except ConfigError as exc:
                raise ConfigError(f"variant {v.label!r}: {exc}") from None
            if v.label not in checked:
                check_variant(cfg, v.label)
                checked.add(v.label)
            plan.append((v, seed, cfg, out / v.label / f"seed{seed}"))
    with RunLock(_grid_dir(out), "mtlcv compare"):
        for k, (v, seed, cfg, run) in enumerate(plan, 1):
            done = _finished(run, cfg)
            if done is not None:
                log(f"[{k}/{total}] {v.label} seed {seed}: finished run reused ({run})")
                v.runs[seed] = done
                continue
            log(f"[{k}/{total}] {v.label} seed {seed} -> {run}")
            v.runs[seed] = train(
                cfg, run, resume=(run / "last.pt").is_file(), log=log, command="mtlcv compare"
            )
    return vs, base_v


def _grid_dir(out: Path) -> Path:
    """``out``, created; a one-line ConfigError when it cannot be."""
    from .checkpoint import _reason

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the grid directory {str(out)!r}: {_reason(exc)}") \
            from None
    return out


def summarise(
    vs: Sequence[Variant], base_v: Variant | None, higher: dict[str, dict[str, bool]]
) -> list[dict[str, Any]]:
    """One row per variant: mean test metrics over seeds, Δm mean/std, params, step time.

    Δm is taken over the main tasks: auxiliary tasks (``aux_tasks`` of a run) are left out.
    """
    base_mean = None
    if base_v is not None:
        base_mean = _mean_metrics([r["test"] for r in base_v.runs.values()])
    rows = []
    for v in vs:
        results = list(v.runs.values())
        aux = list(results[0].get("aux_tasks") or [])
        row: dict[str, Any] = {
            "label": v.label,
            "overrides": v.overrides,
            "seeds": sorted(v.runs),
            "aux_tasks": aux,
            "test": _mean_metrics([r["test"] for r in results]),
            "parameters": results[0]["parameters"],
            "step_time_s": statistics.mean(r.get("step_time_s", float("nan")) for r in results),
        }
        if base_mean is not None:
            dms = [delta_m(main_metrics(r["test"], aux), base_mean, higher) for r in results]
            row["delta_m"] = statistics.mean(dms)
            row["delta_m_std"] = statistics.stdev(dms) if len(dms) > 1 else 0.0
        rows.append(row)
    return rows


def _mean_metrics(entries: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        t: {m: statistics.mean(e[t][m] for e in entries) for m in entries[0][t]} for t in entries[0]
    }


def _columns(
    higher: dict[str, dict[str, bool]], rows: Sequence[dict[str, Any]] = ()
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(main columns, auxiliary columns): a task auxiliary in any row is shown apart."""
    aux = {t for r in rows for t in r.get("aux_tasks", ())}
    cols = [(t, m) for t, ms in higher.items() for m in ms]
    return [c for c in cols if c[0] not in aux], [c for c in cols if c[0] in aux]


def _value(row: dict[str, Any], t: str, m: str) -> str:
    return f"{row['test'][t][m]:.4g}" if t in row["test"] else "–"


def _cells(
    row: dict[str, Any], cols: tuple[list[tuple[str, str]], list[tuple[str, str]]], has_dm: bool
) -> list[str]:
    main, aux = cols
    cells = [row["label"]] + [_value(row, t, m) for t, m in main]
    if has_dm:
        sd = f" ± {row['delta_m_std']:.2f}" if len(row["seeds"]) > 1 else ""
        cells.append(f"{row['delta_m']:+.2f}{sd}")
    cells += [_value(row, t, m) for t, m in aux]
    return cells + [f"{row['parameters'] / 1e6:.2f} M", f"{row['step_time_s']:.3f}"]


def grid_table(rows: list[dict[str, Any]], higher: dict[str, dict[str, bool]], title: str = ""):
    """A rich table: one row per variant, one column per metric (↑/↓), Δm, params, step time."""
    from rich.table import Table

    cols = _columns(higher, rows)
    has_dm = any("delta_m" in r for r in rows)
    table = Table(title=title or None)
    table.add_column("run")
    for t, m in cols[0]:
        table.add_column(f"{t}\n{m} {'↑' if higher[t][m] else '↓'}", justify="right")
    if has_dm:
        table.add_column("Δm % ↓", justify="right")
    for t, m in cols[1]:
        table.add_column(f"{t} (aux)\n{m} {'↑' if higher[t][m] else '↓'}", justify="right")
    table.add_column("params", justify="right")
    table.add_column("step s", justify="right")
    for r in rows:
        table.add_row(*_cells(r, cols, has_dm))
    return table


def markdown_table(rows: list[dict[str, Any]], higher: dict[str, dict[str, bool]]) -> str:
    """The same table as GitHub markdown, for notes and reports."""
    cols = _columns(higher, rows)
    has_dm = any("delta_m" in r for r in rows)
    head = ["run"] + [f"{t} {m} {'↑' if higher[t][m] else '↓'}" for t, m in cols[0]]
    head += ["Δm % ↓"] if has_dm else []
    head += [f"{t} (aux) {m} {'↑' if higher[t][m] else '↓'}" for t, m in cols[1]]
    head += ["params", "step s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r, cols, has_dm)) + " |" for r in rows]
    return "\n".join(lines)
