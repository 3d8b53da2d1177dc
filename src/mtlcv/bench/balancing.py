"""Step time and peak memory of every balancer relative to equal weighting, in one run.

One training step is what the trainer does: ``forward -> per-task losses -> balancer.backward ->
optimizer.step -> balancer.after_step`` (Adam, the library's default optimizer; ``.grad`` set to
None before the step, as the trainer does; ``before_backward`` and ``after_step`` run the
closures the balancer asks for, e.g. FAMO's second forward pass on the same batch, Auto-λ's
meta step, whose held-out batch is the step's batch here). Every registered balancer runs with
its published defaults on the same hard-sharing model (HPS, light heads) and the same random
batch of 8; the model's weights are restored before every step, so every step sees the same
numbers. Configurations: the tiny
backbone at 64x80 and ResNet-18 (torchvision's, output stride 32) at 96x128, each with 3 tasks
(semseg, depth, normals) and 10 tasks (those kinds again under the names semseg2, depth2, ...).
The CPU runs on one thread by default (``threads``).

Time. After ``warmup`` rounds, ``steps`` rounds are timed. A round runs the methods in a fresh
random order, each one between two steps of equal weighting (the reference ``fixed`` balancer,
``EW m1 EW m2 EW ...``); a method's ratio in a round is its time over the mean of its two
neighbouring EW steps, so load drifting during the run hits every method alike. The reported
ratio is the median over rounds. ``fixed`` is also measured as a method against the reference:
its ratio shows the noise floor of the run.

Memory. One more step per method is measured for peak memory: the tensors alive when the step
starts (model parameters and buffers, the batch, the optimizer's state and the balancer's own
tensors, e.g. DB-MTL's gradient EMA) plus the peak, during the step, of the tensor memory
allocated minus freed since the step began. On CUDA the latter is
``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` at the start; on CPU it is
read from the allocator's events recorded by ``torch.profiler`` (``profile_memory=True``):
every allocation and free in time order, cumulated. This counts tensor storage only (not the
allocator's caching or fragmentation, not Python objects), exactly as ``max_memory_allocated``
does on CUDA. On CPU, a free of a tensor allocated before the step (e.g. a method replacing a
state tensor) is not reported by the profiler, so such methods are measured high, never low.

Targets (project issue 5): representation-space and loss-weighting methods at most 1.2x the
step time of equal weighting; parameter-space methods at most ``1 + 0.6 (T - 1)`` times on
ResNet-18 (the encoder's backward pass, once per task, is the floor; on the tiny backbone their
time is reported without a target); no method above 1.3x the peak memory of equal weighting.

Example::

    >>> from mtlcv.bench.balancing import run
    >>> res = run(["fixed", "mgda-ub"], quick=True, steps=1, warmup=0, progress=False)
    >>> sorted(res["methods"]["mgda-ub"]["results"]) == sorted(res["configs"])
    True
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from ..errors import ConfigError

#: the task kinds cycled through to make T tasks (the k-th repeat of a kind is named kind<k>)
TASK_KINDS = ("semseg", "depth", "normals")


@dataclass(frozen=True)
class BenchConfig:
    """One model + batch on which every method is measured."""

    name: str
    backbone: dict[str, Any]
    size: tuple[int, int]
    num_tasks: int
    batch_size: int = 8
    head: dict[str, Any] = field(default_factory=lambda: {"name": "light"})

    @property
    def is_resnet18(self) -> bool:
        return self.backbone.get("name") == "resnet18"


def _configs(batch_size: int = 8) -> dict[str, BenchConfig]:
    tiny = {"name": "tiny"}
    r18 = {"name": "resnet18"}
    out = [BenchConfig(f"tiny-64x80-T{T}", tiny, (64, 80), T, batch_size) for T in (3, 10)]
    out += [BenchConfig(f"resnet18-96x128-T{T}", r18, (96, 128), T, batch_size) for T in (3, 10)]
    return {c.name: c for c in out}


#: the full benchmark's configurations
CONFIGS = _configs()
#: quick mode: the tiny backbone only, batch 2 (for tests and a smoke run)
QUICK_CONFIGS = {k: v for k, v in _configs(batch_size=2).items() if k.startswith("tiny")}


# ------------------------------------------------------------------ setup
def make_tasks(num_tasks: int) -> dict[str, Any]:
    """T tasks cycling through semseg, depth, normals; repeats are named ``depth2``, ..."""
    from .. import tasks as task_registry

    out: dict[str, Any] = {}
    for i in range(num_tasks):
        kind = TASK_KINDS[i % len(TASK_KINDS)]
        name = kind if i < len(TASK_KINDS) else f"{kind}{i // len(TASK_KINDS) + 1}"
        task = task_registry.create(kind)
        task.name = name  # the batch and prediction key
        out[name] = task
    return out


def make_batch(tasks: dict[str, Any], batch: int, size: tuple[int, int], device: torch.device,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch following the batch contract (image in [0, 1], valid targets)."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    out = {"image": torch.rand(batch, 3, H, W, generator=g)}
    for name, task in tasks.items():
        kind = type(task).__name__.lower()
        if "segment" in kind:
            out[name] = torch.randint(0, task.channels, (batch, H, W), generator=g)
        elif "normal" in kind:
            n = torch.randn(batch, 3, H, W, generator=g)
            out[name] = n / n.norm(dim=1, keepdim=True)
        else:
            out[name] = 0.5 + 4 * torch.rand(batch, 1, H, W, generator=g)
    return {k: v.to(device) for k, v in out.items()}


def method_info(name: str, balancer: nn.Module) -> tuple[str, str]:
    """``(family, gradient mode)`` of a balancer: mode ``param``/``rep`` for gradient methods,
    ``layer`` for GradNorm (gradients of the last shared layer), ``-`` for loss weighting."""
    family = getattr(balancer, "family", "weighting")
    mode = getattr(balancer, "mode", None)
    if mode is None:
        mode = "layer" if name == "gradnorm" else "-"
    return family, mode


def time_target(mode: str, cfg: BenchConfig) -> float | None:
    """The step-time target relative to equal weighting (None: no target on this config):
    ``1 + 0.6 (T - 1)`` for parameter-space methods on ResNet-18, 1.2 for representation-space
    methods and loss weighting (GradNorm included) everywhere."""
    if mode == "param":
        return 1.0 + 0.6 * (cfg.num_tasks - 1) if cfg.is_resnet18 else None
    return 1.2


#: no method above this peak memory relative to equal weighting
MEMORY_TARGET = 1.3


class _Runner:
    """One method's balancer and optimizer on the shared model and batch."""

    def __init__(self, name: str, model: nn.Module, tasks: dict[str, Any],
                 batch: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor]) -> None:
        from .. import balancing

        self.name = name
        self.model, self.tasks, self.batch, self.snapshot = model, tasks, batch, snapshot
        self.balancer = balancing.create(name, num_tasks=len(tasks)).to(batch["image"].device)
        params = [*model.parameters(), *self.balancer.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=1e-3)

    def prepare(self) -> None:
        """Outside the measured step: restore the weights, drop grads and the last graph."""
        self.model.load_state_dict(self.snapshot)
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "representation"):
            self.model.representation = None

    def losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        preds = self.model(batch["image"])
        return torch.stack([t.loss(preds[n], batch[n]) for n, t in self.tasks.items()])

    def step(self) -> torch.Tensor:
        from ..engine.closures import StepContext, after_step, before_backward

        losses = self.losses(self.batch)
        # as the trainer: the closures a balancer uses before the update (Auto-λ's meta step;
        # its held-out batch is the same batch here: same cost, the bench measures time)
        ctx = StepContext(self.batch, self.losses, heldout=lambda: self.batch,
                          optimizer=self.optimizer)
        before_backward(self.balancer, ctx)
        self.balancer.backward(losses, self.model)
        self.optimizer.step()
        # what the trainer does next: the closures the balancer asked for (FAMO's extra forward)
        after_step(self.balancer, ctx)
        return losses.detach()

    def live_bytes(self) -> int:
        """Bytes of the tensors this method keeps alive between steps (see the module doc)."""
        tensors: list[torch.Tensor] = [*self.model.parameters(), *self.model.buffers()]
        tensors += list(self.batch.values())
        tensors += [*self.balancer.parameters(), *self.balancer.buffers()]
        tensors += [v for v in vars(self.balancer).values() if isinstance(v, torch.Tensor)]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return _storage_bytes(tensors)


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(runner: _Runner, device: torch.device) -> float:
    runner.prepare()
    _sync(device)
    t0 = time.perf_counter()
    runner.step()
    _sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (Python's sys.stderr is flushed
    first and keeps working once restored); native libraries' messages are dropped."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_step_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of (tensor bytes allocated - freed) while ``fn()`` runs (see the module doc)."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    # the profiler's C++ side writes a start/stop line (and an allocator warning) to fd 2 for
    # every profiled step: hundreds of lines over a full benchmark, so they are swallowed
    with _native_stderr_silenced(), profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


# ------------------------------------------------------------------ the benchmark
def run(
    methods: Sequence[str] | None = None,
    configs: Sequence[str] | None = None,
    steps: int = 5,
    warmup: int = 1,
    quick: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Measure every method on every configuration; return a JSON-able result.

    Args:
        methods: balancer names (default: every registered one); ``fixed`` is always measured.
        configs: names from :data:`CONFIGS` (quick: :data:`QUICK_CONFIGS`); default: all.
        steps: timed rounds (the median is reported); ``quick`` caps it at 2.
        warmup: untimed rounds first (allocations, lazy initialisation, batched-Jacobian probe).
        quick: the tiny backbone only at batch 2 and few steps (tests, smoke runs).
        progress: print one line per round to stderr.
        device: default CUDA when available, else CPU.
        threads: CPU threads for the run (restored afterwards); None keeps torch's setting. One
            thread by default: on a shared machine, OpenMP threads waiting for each other at every
            operator made steps 10x slower and the ratios meaningless.

    Returns:
        ``{"device", "torch", "threads", "steps", "warmup", "memory", "configs": {name: {...,
        "ew_time_s", "ew_peak_bytes"}}, "methods": {name: {"family", "mode", "results":
        {config: {"time_ratio", "time_s", "mem_ratio", "peak_bytes", "time_target", "time_ok",
        "mem_ok", "error"}}, "ok"}}}``; ratios are relative to equal weighting.
    """
    from .. import balancing  # noqa: F401  (registers the balancers)
    from ..registry import BALANCERS

    known = BALANCERS.names()
    names = list(known if methods is None else methods)
    for n in names:
        if n not in known:
            raise ConfigError(f"bench balancing: unknown method {n!r}; valid: {', '.join(known)}")
    if "fixed" not in names:
        names.insert(0, "fixed")
    table = QUICK_CONFIGS if quick else CONFIGS
    cfg_names = list(table if configs is None else configs)
    for c in cfg_names:
        if c not in table:
            raise ConfigError(f"bench balancing: unknown config {c!r}; valid: {', '.join(table)}")
    if quick:
        steps = min(steps, 2)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"bench balancing: steps must be >= 1 and warmup >= 0, got "
                          f"{steps} and {warmup}")
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(names, table, cfg_names, steps, warmup, dev, seed, say)
    finally:
        torch.set_num_threads(old_threads)


def _run(names: list[str], table: dict[str, BenchConfig], cfg_names: list[str], steps: int,
         warmup: int, dev: torch.device, seed: int, say: Callable[[str], None]) -> dict[str, Any]:
    from ..models.build import build_model


    result: dict[str, Any] = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "optimizer": "adam",
        "memory": "cuda max_memory_allocated" if dev.type == "cuda"
        else "cpu allocator events (torch.profiler profile_memory)",
        "configs": {},
        "methods": {},
    }
    for name in names:
        result["methods"][name] = {"family": None, "mode": None, "results": {}}

    for cname in cfg_names:
        cfg = table[cname]
        torch.manual_seed(seed)
        tasks = make_tasks(cfg.num_tasks)
        model = build_model("hps", tasks, cfg.backbone, cfg.head).to(dev)
        model.train()
        batch = make_batch(tasks, cfg.batch_size, cfg.size, dev, seed)
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ref = _Runner("fixed", model, tasks, batch, snapshot)
        runners: dict[str, _Runner] = {}
        errors: dict[str, str] = {}
        for name in names:
            try:
                runners[name] = _Runner(name, model, tasks, batch, snapshot)
            except Exception as exc:  # a method that cannot run here is reported, not fatal
                errors[name] = f"{type(exc).__name__}: {exc}"
        ratios: dict[str, list[float]] = {n: [] for n in runners}
        times: dict[str, list[float]] = {n: [] for n in runners}
        ew_times: list[float] = []
        rng = random.Random(seed)
        t_cfg = time.perf_counter()
        for r in range(warmup + steps):
            order = [n for n in runners if n not in errors]
            rng.shuffle(order)
            before = _timed(ref, dev)
            for n in order:
                try:
                    t = _timed(runners[n], dev)
                except Exception as exc:
                    errors[n] = f"{type(exc).__name__}: {exc}"
                    continue
                after = _timed(ref, dev)
                if r >= warmup:
                    ratios[n].append(t / (0.5 * (before + after)))
                    times[n].append(t)
                    ew_times.append(after)
                before = after
            if r == warmup - 1 or (warmup == 0 and r == 0):
                # two epochs' worth of history, so DWA and DTP leave their start-up rules
                for runner in runners.values():
                    runner.prepare()
                    losses = runner.step().tolist()
                    for epoch in range(2):
                        runner.balancer.on_epoch_end(epoch, losses, [0.5] * len(losses))
            say(f"[bench balancing] {cname}: round {r + 1}/{warmup + steps} "
                f"({time.perf_counter() - t_cfg:.0f} s)")
        # memory: one profiled step each (after the timing, so nothing is lazily allocated)
        ref.prepare()
        ew_live = ref.live_bytes()
        ew_peak = ew_live + peak_step_bytes(ref.step, dev)
        peaks: dict[str, int] = {}
        for n, runner in runners.items():
            if n in errors:
                continue
            runner.prepare()
            try:
                peaks[n] = runner.live_bytes() + peak_step_bytes(runner.step, dev)
            except Exception as exc:
                errors[n] = f"{type(exc).__name__}: {exc}"
        ew_time = statistics.median(ew_times) if ew_times else math.nan
        result["configs"][cname] = {
            **{k: v for k, v in asdict(cfg).items() if k != "name"},
            "shared_params": sum(p.numel() for p in model.shared_parameters()),
            "params": sum(p.numel() for p in model.parameters()),
            "ew_time_s": ew_time,
            "ew_peak_bytes": ew_peak,
        }
        for name in names:
            entry = result["methods"][name]
            runner = runners.get(name)
            if runner is not None and entry["family"] is None:
                entry["family"], entry["mode"] = method_info(name, runner.balancer)
            mode = entry["mode"] or "-"
            target = time_target(mode, cfg)
            res: dict[str, Any] = {"time_target": target, "mem_target": MEMORY_TARGET}
            if name in errors or not ratios.get(name):
                res.update(time_ratio=None, time_s=None, mem_ratio=None, peak_bytes=None,
                           time_ok=False, mem_ok=False,
                           error=errors.get(name, "no measurement"))
            else:
                tr = statistics.median(ratios[name])
                mr = peaks[name] / ew_peak
                res.update(
                    time_ratio=tr, time_s=statistics.median(times[name]), mem_ratio=mr,
                    peak_bytes=peaks[name], time_ok=None if target is None else tr <= target,
                    mem_ok=mr <= MEMORY_TARGET, error=None,
                )
            entry["results"][cname] = res
        del runners, ref, model
    for entry in result["methods"].values():
        rs = entry["results"].values()
        entry["ok"] = all(r["time_ok"] is not False and r["mem_ok"] for r in rs)
    return result


# ------------------------------------------------------------------ output
def format_table(result: dict[str, Any]) -> Any:
    """A rich Table: one row per method, ``time x / memory x`` per configuration."""
    from rich.table import Table

    cfgs = list(result["configs"])
    table = Table(
        title=f"Balancers vs equal weighting: step time x / peak memory x ({result['device']}, "
              f"median of {result['steps']} steps)",
        caption="targets: rep/weighting time <= 1.2x; param time <= 1+0.6(T-1)x on ResNet-18; "
                "memory <= 1.3x; red = missed",
    )
    table.add_column("method")
    table.add_column("family")
    table.add_column("mode")
    for c in cfgs:
        table.add_column(c, justify="right")
    table.add_column("targets")
    for name, entry in result["methods"].items():
        cells = []
        for c in cfgs:
            r = entry["results"].get(c)
            if r is None or r["error"]:
                cells.append("[red]error[/red]")
                continue
            t = f"{r['time_ratio']:.2f}"
            m = f"{r['mem_ratio']:.2f}"
            if r["time_ok"] is False:
                t = f"[red]{t}[/red]"
            if not r["mem_ok"]:
                m = f"[red]{m}[/red]"
            cells.append(f"{t} / {m}")
        verdict = "[green]met[/green]" if entry["ok"] else "[red]missed[/red]"
        table.add_row(name, entry["family"] or "?", entry["mode"] or "?", *cells, verdict)
    ew = [f"{c}: {v['ew_time_s'] * 1e3:.0f} ms, {v['ew_peak_bytes'] / 2**20:.0f} MiB"
          for c, v in result["configs"].items()]
    table.caption += "\nequal weighting: " + "; ".join(ew)
    return table


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``mtlcv bench balancing [--json] [--quick] [--steps N] ...``; the JSON or the table goes
    to ``out`` (default stdout), progress to stderr."""
    ap = argparse.ArgumentParser(prog="mtlcv bench balancing", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--quick", action="store_true", help="tiny backbone only, few steps")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--methods", nargs="+", help="balancer names (default: all)")
    ap.add_argument("--configs", nargs="+", help=f"configurations (default: {', '.join(CONFIGS)})")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1; 0 keeps torch's default)")
    args = ap.parse_args(argv)
    try:
        res = run(args.methods, args.configs, args.steps, args.warmup, args.quick,
                  progress=True, device=args.device, threads=args.threads or None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2), file=out or sys.stdout)
    else:
        from rich.console import Console

        Console(file=out).print(format_table(res))
    return 0
