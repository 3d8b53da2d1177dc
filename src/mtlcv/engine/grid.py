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

``--jobs N`` trains up to N runs at once, each in its own process (``python -m mtlcv train``,
its output in ``<run>/train.log``) with ``train.threads`` lowered so that N × threads does not
exceed the CPU cores; a run starts once its seed's baseline run has finished. One progress
display covers the whole grid. Ctrl-C stops every run, keeping its last checkpoint (each child
gets one SIGINT); SIGTERM is passed on (each child finishes its step and saves it); the same
command resumes them. ``DIR/grid.json`` records the plan
(variants, seeds, baseline) for ``mtlcv report``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..analysis import delta_m, main_metrics
from ..config import ExperimentConfig, apply_overrides, dump, from_dict, load, to_dict
from ..errors import ConfigError, MtlcvError, TrainingError
from .runlock import RunLock

#: the grid's plan, written when a grid starts (read by ``mtlcv report``)
MANIFEST = "grid.json"


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


def grid_section(section: Any, where: str | Path = "config") -> dict[str, Any]:
    """The optional ``grid:`` section of a ``mtlcv compare`` config, checked.

    ``{vary: {KEY: [V1, V2, ...], ...}, seeds: [S, ...], baseline: KEY=VALUE}`` (every key
    optional) says what ``--vary``, ``--seeds`` and ``--baseline`` would; flags given on the
    command line replace the section's entries. Returns ``{"vary": [(key, [values])],
    "seeds": [...], "baseline": str | None}`` (defaults: no variation, seed 0, no baseline).

    Example:
        >>> grid_section({"vary": {"model.arch": ["stl", "hps"]}, "seeds": [0, 1]})["vary"]
        [('model.arch', ['stl', 'hps'])]
    """
    out: dict[str, Any] = {"vary": [], "seeds": [0], "baseline": None}
    if section is None:
        return out
    at = f"{str(where)!r}, key 'grid'"
    if not isinstance(section, dict):
        raise ConfigError(f"{at}: expected a mapping with vary, seeds and baseline")
    unknown = sorted(set(section) - {"vary", "seeds", "baseline"})
    if unknown:
        raise ConfigError(f"{at}: unknown key {unknown[0]!r}; valid keys: vary, seeds, baseline")
    vary = section.get("vary") or {}
    if not isinstance(vary, dict):
        raise ConfigError(f"{at}.vary: expected a mapping KEY: [V1, V2, ...], got {vary!r}")
    for key, values in vary.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"{at}.vary.{key}: expected at least one value")
        # values go through the same YAML parsing as --vary KEY=V: strings as they are,
        # anything else (numbers, lists) in YAML flow style
        text = [v if isinstance(v, str) else json.dumps(v) for v in values]
        out["vary"].append((str(key), text))
    seeds = section.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds):
        raise ConfigError(f"{at}.seeds: expected a list of integers, got {seeds!r}")
    out["seeds"] = seeds
    baseline = section.get("baseline")
    if baseline is not None and not (isinstance(baseline, str) and "=" in baseline):
        raise ConfigError(f"{at}.baseline: expected KEY=VALUE, e.g. model.arch=stl, "
                          f"got {baseline!r}")
    out["baseline"] = baseline
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


def _settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config without the keys that do not change a run's result (threads, progress, the
    device, data workers, gradient logging), which ``--jobs`` and reruns may set differently.
    """
    from .trainer import RESUMABLE_CHANGES

    data = to_dict(cfg)
    for key in RESUMABLE_CHANGES:
        if key == "train.epochs":  # a finished run of other length is another result
            continue
        section, name = key.split(".", 1)
        data.get(section, {}).pop(name, None)
    return data


def _finished(run: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    res, saved = run / "results.json", run / "config.yaml"
    if not (res.is_file() and saved.is_file()):
        return None
    with RunLock(run, "mtlcv compare"):  # a run another process still writes is not reused
        if _settings(load(saved)) != _settings(cfg):
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


@dataclass(eq=False)
class Job:
    """One run of the grid: a variant at a seed, and the baseline run it selects against."""

    variant: Variant
    seed: int
    cfg: ExperimentConfig
    run: Path
    after: Job | None = None

    @property
    def name(self) -> str:
        return f"{self.variant.label} seed {self.seed}"


def plan_grid(
    base: dict[str, Any],
    vary: Sequence[tuple[str, list[str]]],
    seeds: Sequence[int],
    out: str | Path,
    baseline: str | None = None,
    check: bool = True,
) -> tuple[list[Variant], Variant | None, list[Job]]:
    """Every variant × seed as a :class:`Job` (baseline runs first), configs validated; with
    ``check`` every variant's dataset, model and balancer are also built once."""
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
    jobs: list[Job] = []
    firsts: dict[int, Job] = {}
    # every run's config, checked before the first one trains (a typo must not cost hours)
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
            if check and v.label not in checked:
                check_variant(cfg, v.label)
                checked.add(v.label)
            job = Job(v, seed, cfg, out / v.label / f"seed{seed}")
            if base_v is not None:
                if v is base_v:
                    firsts[seed] = job
                else:
                    job.after = firsts[seed]
            jobs.append(job)
    return vs, base_v, jobs


def _write_manifest(
    out: Path, vs: Sequence[Variant], base_v: Variant | None, seeds: Sequence[int],
    vary: Sequence[tuple[str, list[str]]],
) -> None:
    from .checkpoint import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "vary": [[k, list(vals)] for k, vals in vary],
        "seeds": list(seeds),
        "baseline": None if base_v is None else base_v.label,
        "variants": [{"label": v.label, "overrides": v.overrides} for v in vs],
    }
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", out / MANIFEST)


def run_grid(
    base: dict[str, Any],
    vary: Sequence[tuple[str, list[str]]],
    seeds: Sequence[int],
    out: str | Path,
    baseline: str | None = None,
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> tuple[list[Variant], Variant | None]:
    """Train every variant × seed (baseline first); return the variants with their results.

    ``jobs`` > 1 trains that many runs at once in child processes (see the module docstring).
    """
    from .trainer import train

    out = Path(out)
    vs, base_v, plan = plan_grid(base, vary, seeds, out, baseline)
    if jobs > 1:
        jobs = _check_jobs(jobs)
    with RunLock(_grid_dir(out), "mtlcv compare"):  # one process runs a grid folder at a time
        _write_manifest(out, vs, base_v, seeds, vary)
        total = len(plan)
        todo = []
        for k, job in enumerate(plan, 1):
            done = _finished(job.run, job.cfg)
            if done is not None:
                log(f"[{k}/{total}] {job.name}: finished run reused ({job.run})")
                job.variant.runs[job.seed] = done
            else:
                todo.append(job)
        if jobs > 1 and todo:
            _run_parallel(plan, todo, jobs, log)
            return vs, base_v
        for job in todo:
            k = plan.index(job) + 1
            log(f"[{k}/{total}] {job.name} -> {job.run}")
            resume = (job.run / "last.pt").is_file()
            job.variant.runs[job.seed] = train(job.cfg, job.run, resume=resume, log=log,
                                               command="mtlcv compare")
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


# ---------------------------------------------------------------------- parallel runs
def cpu_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _check_jobs(jobs: int) -> int:
    cores = cpu_cores()
    if jobs > cores:
        raise ConfigError(
            f"--jobs {jobs}: only {cores} CPU core{'s' if cores > 1 else ''} available; "
            f"use --jobs {cores} or fewer (each run needs at least one thread)"
        )
    return jobs


def _last_error(log_path: Path) -> str:
    """The child's one-line error (``mtlcv: error: ...``), else its last line."""
    try:
        lines = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x.removeprefix("mtlcv: error:").strip() for x in lines
              if x.startswith("mtlcv: error:")]
    return (errors or lines or ["no output"])[-1]


def _epochs_done(run: Path) -> int:
    try:
        return sum(1 for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip())
    except OSError:
        return 0


class _Display:
    """One progress display for the whole grid: epochs done over all runs, and what runs now.

    On a terminal a rich progress bar (events printed above it); otherwise one line per event.
    """

    def __init__(self, plan: Sequence[Job], todo: Sequence[Job], log: Callable[[str], None]):
        self.log = log
        self.total = sum(j.cfg.train.epochs for j in plan)
        self.base = sum(j.cfg.train.epochs for j in plan if j not in todo)
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]grid epochs"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[now]}"),
            )
            self.task = self.bar.add_task("grid", total=self.total, completed=self.base, now="")
            self.bar.start()

    def event(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            self.log(text)

    def update(self, finished: Sequence[Job], running: Sequence[Job]) -> None:
        if self.bar is None:
            return
        done = self.base + sum(j.cfg.train.epochs for j in finished)
        done += sum(_epochs_done(j.run) for j in running)
        now = ", ".join(
            f"{j.name} ({_epochs_done(j.run)}/{j.cfg.train.epochs})" for j in running
        )
        self.bar.update(self.task, completed=min(done, self.total), now=now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _run_parallel(
    plan: Sequence[Job], todo: Sequence[Job], jobs: int, log: Callable[[str], None]
) -> None:
    """Train ``todo`` with up to ``jobs`` child processes; fill each variant's ``runs``."""
    threads = max(1, cpu_cores() // jobs)
    total = len(plan)
    pending = list(todo)
    running: dict[Job, tuple[subprocess.Popen, Any, float]] = {}
    finished: list[Job] = []
    failed: dict[Job, str] = {}
    display = _Display(plan, todo, log)
    display.event(
        f"{len(todo)} of {total} runs to train, {jobs} at a time, {threads} "
        f"thread{'s' if threads > 1 else ''} each (logs: <run>/train.log)"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="mtlcv-grid-") as tmp:
        try:
            while pending or running:
                for job in list(pending):
                    if len(running) >= jobs:
                        break
                    if job.after is not None and job.after in failed:
                        pending.remove(job)
                        failed[job] = f"its baseline run ({job.after.name}) failed"
                        continue
                    if job.after is not None and job.after.seed not in job.after.variant.runs:
                        continue  # waits for its seed's baseline run
                    pending.remove(job)
                    running[job] = _start(job, threads, Path(tmp), env)
                    k = plan.index(job) + 1
                    display.event(f"[{k}/{total}] {job.name} -> {job.run}")
                for job, (proc, fh, t0) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    fh.close()
                    del running[job]
                    res = job.run / "results.json"
                    if rc == 0 and res.is_file():
                        job.variant.runs[job.seed] = json.loads(res.read_text())
                        finished.append(job)
                        display.event(f"{job.name}: done in {time.perf_counter() - t0:.0f} s")
                    else:
                        failed[job] = _last_error(job.run / "train.log")
                        display.event(f"{job.name}: FAILED ({failed[job]})")
                display.update(finished, list(running))
                if pending or running:
                    time.sleep(0.2)
        except BaseException as exc:  # Ctrl-C, SIGTERM (the CLI raises it here), any error
            display.close()
            _interrupt(running, signal.SIGINT if isinstance(exc, KeyboardInterrupt)
                       else signal.SIGTERM)
            raise
        finally:
            display.close()
    if failed:
        lines = "; ".join(f"{j.name}: {why} (log: {j.run / 'train.log'})" for j, why in
                          failed.items())
        raise TrainingError(
            f"{len(failed)} of {total} runs failed: {lines}; fix the cause and rerun the same "
            "command (finished runs are reused)"
        )


def _start(job: Job, threads: int, tmp: Path, env: dict[str, str]):
    """Launch ``python -m mtlcv train`` for ``job`` in its own session (Ctrl-C goes through us)."""
    train = job.cfg.train
    cfg = replace(job.cfg, train=replace(
        train, threads=min(train.threads or threads, threads), progress=False
    ))
    path = tmp / f"{job.variant.label}-seed{job.seed}.yaml".replace("/", "_")
    dump(cfg, path)
    job.run.mkdir(parents=True, exist_ok=True)
    fh = open(job.run / "train.log", "a")  # noqa: SIM115 - closed when the child ends
    cmd = [sys.executable, "-m", "mtlcv", "train", "--config", str(path), "--out", str(job.run)]
    if (job.run / "last.pt").is_file():
        cmd.append("--resume")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    return proc, fh, time.perf_counter()


def _interrupt(running: dict[Job, tuple[subprocess.Popen, Any, float]],
               sig: int = signal.SIGINT) -> None:
    """Stop every child with one ``sig`` and wait: SIGINT (Ctrl-C) keeps each run's last
    checkpoint, SIGTERM makes each finish its step and save one (exit 75); a rerun resumes."""
    for proc, _, _ in running.values():
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + 120
    for proc, fh, _ in running.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fh.close()


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
