"""What ``train.log_gradients_every`` costs: one logged step against one plain training step.

    python benchmarks/gradient_logging.py [--archs hps,mtan] [--size 96x128] [--batch 8]
                                          [--reps 7] [--threads 1]

For each architecture (tiny backbone, the scenes data, equal weights), on the same batch and
interleaved (plain step, measurement, plain step, ...), the median time of

* a plain training step: forward, per-task losses, balancer backward, optimizer step;
* the measurement the trainer adds on a logged step (:class:`mtlcv.engine.gradient_log.
  GradientLog`: forward, per-task gradients of the shared parameters, one lookahead forward per
  task, buffer and RNG restore).

It prints the ratio ``measurement / plain step`` and what that adds to training when logging
every N steps (``ratio / N``). Ratios, not seconds, are the result: they transfer between
machines far better than times do.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mtlcv.config import from_dict
from mtlcv.engine.evaluate import to_device
from mtlcv.engine.gradient_log import GradientLog
from mtlcv.engine.trainer import Trainer


def measure(arch: str, size: tuple[int, int], batch: int, reps: int) -> tuple[float, float]:
    cfg = from_dict({
        "name": "bench", "tasks": ["semseg", "depth", "normals"],
        "data": {"name": "scenes", "batch_size": batch,
                 "options": {"n": max(3 * batch, 60), "size": list(size), "seed": 0}},
        "model": {"arch": arch, "backbone": {"name": "tiny"}, "head": {"name": "light"}},
        "train": {"epochs": 1, "progress": False},
    })
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d, log=lambda s: None)
        loader = iter(tr.exp.datasets["train"])
        items = [next(loader) for _ in range(batch)]
        b = to_device({k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]},
                      tr.device)
        glog = GradientLog(1, tr.names, d)

        def step() -> None:
            preds = tr.model(b["image"])
            losses = tr._losses(preds, b)
            tr.optimizer.zero_grad(set_to_none=True)
            tr.balancer.backward(losses, tr.model)
            tr.optimizer.step()

        def probe() -> None:
            glog.measure(tr.model, b["image"], lambda p: tr._losses(p, b), lr=1e-3, epoch=1,
                         step=1, global_step=0)

        step()
        probe()  # warm-up
        plain, logged = [], []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            probe()
            logged.append(time.perf_counter() - t)
        return statistics.median(plain), statistics.median(logged)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="hps,mtan,cross_stitch,padnet")
    p.add_argument("--size", default="96x128")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    h, w = (int(v) for v in a.size.split("x"))
    print(f"tiny backbone, 3 tasks, {h}x{w}, batch {a.batch}, {a.threads} thread(s), "
          f"median of {a.reps} interleaved repetitions")
    print(f"{'arch':14s} {'step s':>8s} {'logged s':>9s} {'ratio':>6s} {'every 10':>9s} "
          f"{'every 50':>9s}")
    for arch in a.archs.split(","):
        plain, logged = measure(arch, (h, w), a.batch, a.reps)
        r = logged / plain
        print(f"{arch:14s} {plain:8.3f} {logged:9.3f} {r:6.2f} {r / 10:+9.1%} {r / 50:+9.1%}")


if __name__ == "__main__":
    main()
