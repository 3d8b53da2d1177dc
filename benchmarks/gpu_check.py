"""The GPU path, checked and timed in one script (project issue 14, item 6); run it through
``benchmarks/gpu_check.sh [OUT.json]`` (at most ~8 minutes on one GPU).

(a) **CUDA step = CPU step.** For every architecture x {fixed, pcgrad, nashmtl, upgrad}: the
    same initial weights (built on the CPU from one seed, then copied), the same random batch
    (tiny backbone of width 8, 3 tasks: semseg, depth, normals, 64x80, batch 2), one training
    step (forward, per-task losses, ``balancer.backward``, SGD lr 0.01 — SGD, not Adam, so that
    the weight difference is ``lr x`` the gradient difference and not Adam's sign-like first
    step amplifying rounding), on the device and on the CPU; the max abs difference of every
    weight after the step must be <= ``TOLERANCE`` (1e-4; TF32 is switched off so CUDA
    matmuls and convolutions run in full float32; what is left is the order of float32
    reductions, ~1e-6 relative).
(b) **Timings** (median of the timed steps after warm-up, ``torch.cuda.synchronize`` around
    each, ``torch.cuda.max_memory_allocated`` for peak memory): SegNet-MTAN, NYUv2's protocol
    step (288x384, batch 2, random data, Adam) with equal weights and with Nash-MTL; ResNet-50
    (dilated, ASPP heads: LibMTL's NYUv2 model) hard sharing at batch 8, float32 and bfloat16
    autocast.
(c) The numbers as JSON to the path given (default ``gpu_check.json``).

Without CUDA the script exits with a one-line message (code 2), unless ``--device cpu`` is
given: then everything runs on the CPU against the CPU (``--quick``: small sizes, two
architectures' worth of time), which is how the test suite checks that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mtlcv import balancing
from mtlcv.bench.balancing import make_batch, make_tasks
from mtlcv.models.build import build_model
from mtlcv.registry import ARCHS

#: max abs weight difference allowed between the device's step and the CPU's
TOLERANCE = 1e-4
METHODS = ("fixed", "pcgrad", "nashmtl", "upgrad")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def one_step(model: torch.nn.Module, tasks: dict, batch: dict, method: str,
             amp: torch.dtype | None = None, opt: torch.optim.Optimizer | None = None) -> None:
    dev = batch["image"].device
    bal = balancing.create(method, num_tasks=len(tasks)).to(dev)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad(set_to_none=True)
    ctx = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        preds = model(batch["image"])
        losses = torch.stack([t.loss(preds[n], batch[n]) for n, t in tasks.items()])
    bal.backward(losses.float(), model)
    opt.step()


def check_steps(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """(a): every architecture x method, device step vs CPU step."""
    size, bs = ((32, 48), 2) if quick else ((64, 80), 2)
    archs = ("hps", "mtan") if quick else tuple(ARCHS.names())
    methods = ("fixed", "nashmtl") if quick else METHODS
    out = []
    for arch in archs:
        for method in methods:
            torch.manual_seed(0)
            tasks = make_tasks(3)
            rec: dict[str, Any] = {"arch": arch, "method": method}
            try:
                cpu_model = build_model(arch, tasks, {"name": "tiny", "width": 8},
                                        {"name": "light"}).train()
                dev_model = copy.deepcopy(cpu_model).to(device)
                batch = make_batch(tasks, bs, size, torch.device("cpu"), seed=0)
                one_step(cpu_model, tasks, batch, method)
                one_step(dev_model, tasks, {k: v.to(device) for k, v in batch.items()}, method)
                diff = max(float((a.detach().cpu() - b.detach()).abs().max())
                           for a, b in zip(dev_model.parameters(), cpu_model.parameters()))
                rec.update(max_abs_diff=diff, ok=diff <= TOLERANCE)
            except Exception as exc:  # reported, the other combinations still run
                rec.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                           ok=False)
            out.append(rec)
            print(f"[gpu check] step {arch} {method}: "
                  + (f"max abs diff {rec['max_abs_diff']:.2e}" if "max_abs_diff" in rec
                     else rec["error"]), file=sys.stderr, flush=True)
    return out


def time_step(name: str, arch: str, backbone: dict, head: dict, options: dict, size: tuple,
              bs: int, method: str, amp: torch.dtype | None, device: torch.device, steps: int,
              warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    tasks = make_tasks(3)
    model = build_model(arch, tasks, backbone, head, options).to(device).train()
    batch = make_batch(tasks, bs, size, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        one_step(model, tasks, batch, method, amp, opt)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    rec = {"name": name, "arch": arch, "backbone": backbone["name"], "size": list(size),
           "batch_size": bs, "method": method,
           "dtype": "bfloat16 autocast" if amp is not None else "float32",
           "step_s": statistics.median(times), "steps": steps,
           "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        rec["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"[gpu check] time {name}: {rec['step_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return rec


def timings(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """(b)."""
    nyu, r50, steps, warmup = ((288, 384), (288, 384), 10, 3)
    if quick:
        nyu, r50, steps, warmup = (32, 48), (64, 64), 1, 0
    segnet = dict(arch="mtan", backbone={"name": "segnet"}, head={"name": "mtan"},
                  options={"reduction": 1})
    resnet = dict(arch="hps", backbone={"name": "resnet50", "dilated": True},
                  head={"name": "aspp"}, options={})
    runs = [("segnet-mtan-nyuv2-fixed", segnet, nyu, 2, "fixed", None),
            ("segnet-mtan-nyuv2-nashmtl", segnet, nyu, 2, "nashmtl", None),
            ("resnet50-hps-b8-fp32", resnet, r50, 8, "fixed", None),
            ("resnet50-hps-b8-bf16", resnet, r50, 8, "fixed", torch.bfloat16)]
    if quick:  # the CPU check of the script: the small SegNet-MTAN and ResNet-50 runs only
        runs = [runs[0], runs[3]]
        # batch 2: ASPP's image-level batch norm needs more than one value per channel
        runs = [(n, m, s, 2, meth, amp) for n, m, s, _, meth, amp in runs]
    out = []
    for name, m, size, bs, method, amp in runs:
        try:
            out.append(time_step(name, m["arch"], m["backbone"], m["head"], m["options"],
                                 size, bs, method, amp, device, steps, warmup))
        except Exception as exc:
            out.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="gpu_check.json", help="JSON output path")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (script check)")
    ap.add_argument("--quick", action="store_true", help="small sizes (for the test suite)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch "
              f"{torch.__version__}); nothing was run. Run it on a machine with a GPU, or pass "
              "--device cpu to check the script itself.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    steps = check_steps(device, args.quick)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick,
        "tolerance": TOLERANCE, "steps": steps,
        "steps_ok": all(r["ok"] for r in steps),
        "timings": timings(device, args.quick),
    }
    res["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(res, indent=2))
    bad = [f"{r['arch']}/{r['method']}" for r in steps if not r["ok"]]
    print(f"gpu_check: {len(steps) - len(bad)}/{len(steps)} steps within {TOLERANCE:g}"
          + (f" (failed: {', '.join(bad)})" if bad else "") + f"; wrote {args.out} "
          f"({res['wall_s']:.0f} s)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
