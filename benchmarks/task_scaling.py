"""Step time and peak memory as the number of tasks grows (project issue 14, item 4).

    python benchmarks/task_scaling.py [--quick] [--json OUT] [--plot PNG] [--markdown MD]

Model: hard sharing on the tiny backbone (64x80 images, batch 8) with T depth-like regression
heads (``depth``, ``depth2``, ...; the light head), T = 2, 4, 8, 16. Methods: equal weighting
(``fixed``), MGDA-UB, PCGrad, UPGrad, Nash-MTL, each with its published defaults, Adam, one
thread. A step is what the trainer does (``mtlcv.bench.balancing``'s step: forward, losses,
``balancer.backward``, ``optimizer.step``, ``after_step``); the weights are restored before each.

Time: interleaved rounds as in ``mtlcv bench balancing`` (each method between two equal-weighting
steps, in a shuffled order), the median over rounds of the step time and of its ratio to the
neighbouring equal-weighting steps. Memory: the tensors alive at the step's start plus the peak
of (allocated - freed) during it, read from the CPU allocator's events recorded by
``torch.profiler`` (``profile_memory=True``; tensor storage only, not the allocator's cache);
on CUDA, ``torch.cuda.max_memory_allocated``. Growth: a least-squares line ``time = a + b T``
per method; ``b`` (seconds per added task) is reported also as a multiple of equal weighting's
own slope (``x EW per task``: what one more task costs with the method over what it costs with
equal weights, i.e. one more head), with R^2 of the fit.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mtlcv import balancing  # noqa: F401  (registers the balancers)
from mtlcv import tasks as task_registry
from mtlcv.bench.balancing import _Runner, _timed, make_batch, peak_step_bytes
from mtlcv.models.build import build_model

METHODS = ("fixed", "mgda-ub", "pcgrad", "upgrad", "nashmtl")
TS = (2, 4, 8, 16)


def depth_tasks(T: int) -> dict[str, Any]:
    out = {}
    for i in range(T):
        name = "depth" if i == 0 else f"depth{i + 1}"
        task = task_registry.create("depth")
        task.name = name
        out[name] = task
    return out


def measure(T: int, size: tuple[int, int], batch_size: int, rounds: int, warmup: int,
            device: torch.device, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    tasks = depth_tasks(T)
    model = build_model("hps", tasks, {"name": "tiny"}, {"name": "light"}).to(device).train()
    batch = make_batch(tasks, batch_size, size, device, seed)
    snap = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = _Runner("fixed", model, tasks, batch, snap)
    runners = {m: _Runner(m, model, tasks, batch, snap) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    ratios: dict[str, list[float]] = {m: [] for m in METHODS}
    rng = random.Random(seed)
    for r in range(warmup + rounds):
        order = list(METHODS)
        rng.shuffle(order)
        before = _timed(ref, device)
        for m in order:
            t = _timed(runners[m], device)
            after = _timed(ref, device)
            if r >= warmup:
                times[m].append(t)
                ratios[m].append(t / (0.5 * (before + after)))
            before = after
    out: dict[str, Any] = {}
    for m, runner in runners.items():
        runner.prepare()
        peak = runner.live_bytes() + peak_step_bytes(runner.step, device)
        out[m] = {"time_s": statistics.median(times[m]),
                  "time_ratio": statistics.median(ratios[m]), "peak_bytes": peak}
    ew_peak = out["fixed"]["peak_bytes"]
    for m in out:
        out[m]["mem_ratio"] = out[m]["peak_bytes"] / ew_peak
    return out


def fit(ts: list[int], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b t``: ``(a, b, R^2)``."""
    n = len(ts)
    mt, my = sum(ts) / n, sum(ys) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    b = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / sxx
    a = my - b * mt
    ss_res = sum((y - a - b * t) ** 2 for t, y in zip(ts, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return a, b, 1 - ss_res / ss_tot


def run(quick: bool = False, device: str = "cpu", threads: int = 1) -> dict[str, Any]:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    size, bs, rounds, warmup = ((32, 48), 2, 1, 0) if quick else ((64, 80), 8, 5, 1)
    ts = (2, 4) if quick else TS
    res: dict[str, Any] = {"device": device, "torch": torch.__version__, "threads": threads,
                           "size": list(size), "batch_size": bs, "rounds": rounds,
                           "memory": "cpu allocator events (torch.profiler profile_memory)"
                           if dev.type == "cpu" else "cuda max_memory_allocated",
                           "T": list(ts), "results": {}}
    for T in ts:
        t0 = time.perf_counter()
        res["results"][str(T)] = measure(T, size, bs, rounds, warmup, dev)
        print(f"[task scaling] T={T} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    res["growth"] = {}
    for m in METHODS:
        ys = [res["results"][str(T)][m]["time_s"] for T in ts]
        a, b, r2 = fit(list(ts), ys)
        mem = [res["results"][str(T)][m]["peak_bytes"] for T in ts]
        _, bm, r2m = fit(list(ts), [float(x) for x in mem])
        res["growth"][m] = {"intercept_s": a, "slope_s_per_task": b, "r2": r2,
                            "mem_slope_bytes_per_task": bm, "mem_r2": r2m}
    ew = res["growth"]["fixed"]
    for g in res["growth"].values():
        g["slope_x_ew"] = g["slope_s_per_task"] / ew["slope_s_per_task"]
        g["mem_slope_x_ew"] = g["mem_slope_bytes_per_task"] / ew["mem_slope_bytes_per_task"]
    return res


def markdown(res: dict[str, Any]) -> str:
    ts = res["T"]
    head = "| method | " + " | ".join(f"T={T} ms (x EW)" for T in ts) + " | " + " | ".join(
        f"T={T} MiB (x EW)" for T in ts) + " | time per added task | memory per added task |"
    lines = [head, "|" + "---|" * (2 * len(ts) + 3)]
    for m in METHODS:
        cells = []
        for T in ts:
            r = res["results"][str(T)][m]
            cells.append(f"{r['time_s'] * 1e3:.1f} ({r['time_ratio']:.2f})")
        for T in ts:
            r = res["results"][str(T)][m]
            cells.append(f"{r['peak_bytes'] / 2**20:.1f} ({r['mem_ratio']:.2f})")
        g = res["growth"][m]
        cells.append(f"{g['slope_s_per_task'] * 1e3:.1f} ms = {g['slope_x_ew']:.2f}x EW's "
                     f"(R^2 {g['r2']:.3f})")
        cells.append(f"{g['mem_slope_bytes_per_task'] / 2**20:.2f} MiB = "
                     f"{g['mem_slope_x_ew']:.2f}x EW's (R^2 {g['mem_r2']:.3f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = res["T"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for m in METHODS:
        axes[0].plot(ts, [res["results"][str(T)][m]["time_s"] * 1e3 for T in ts], "o-", label=m)
        axes[1].plot(ts, [res["results"][str(T)][m]["peak_bytes"] / 2**20 for T in ts], "o-",
                     label=m)
    axes[0].set(xlabel="tasks T", ylabel="step time (ms)", xscale="log", yscale="log")
    axes[1].set(xlabel="tasks T", ylabel="peak memory (MiB)", xscale="log")
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.set_xticks(ts, [str(T) for T in ts])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"tiny HPS, {res['size'][0]}x{res['size'][1]}, batch {res['batch_size']}, "
                 f"{res['device']}, {res['threads']} thread", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=2,4 at 32x48, one round")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--plot", type=Path, help="write the PNG plot here")
    ap.add_argument("--markdown", type=Path, help="write the markdown table here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-json", type=Path, help="no measurement: redraw from a saved result")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        res = run(args.quick, args.device, args.threads)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.plot:
        plot(res, args.plot)
    table = markdown(res)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
