"""What FAMO's same-batch closure costs: step time with the closure vs without, side by side.

    python benchmarks/famo_closure.py [--rounds 15] [--threads 1] [--json]

FAMO (Liu et al. 2023, Algorithm 1) updates its task logits from the losses of the same batch
after the optimizer step; mtlcv's trainer provides them through the balancer step contract
(``needs = {"losses_after_step"}``): one extra forward pass under ``no_grad``. The alternative,
``losses_after: next_batch``, reuses the next step's losses and costs nothing. This script times
one training step (forward, per-task losses, FAMO backward, Adam step, ``after_step``) of both,
on the same model and batch, interleaved (A B, B A, A B, ... so load drift hits both alike), and
reports the median step time of each and the median of the per-round ratios. The weights are
restored before every step, so every step does the same work.

Configurations: SegNet-MTAN (3 tasks, ``mtan`` head) at width 16 on 144x192 images, batch 2 (the
protocol's architecture, shrunk for a CPU), and hard sharing on the tiny backbone at 96x128,
batch 8. Times are only comparable within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from mtlcv import balancing
from mtlcv.engine.closures import StepContext, after_step
from mtlcv.models import build_model
from mtlcv.registry import TASKS

CONFIGS = {
    "segnet-mtan-w16-144x192-b2": ("mtan", {"name": "segnet", "width": 16}, {"name": "mtan"},
                                   (144, 192), 2),
    "hps-tiny-96x128-b8": ("hps", {"name": "tiny"}, {"name": "light"}, (96, 128), 8),
}


def make(cfg: tuple) -> tuple:
    arch, backbone, head, (h, w), b = cfg
    tasks = {n: TASKS.create(n) for n in ("semseg", "depth", "normals")}
    for n, t in tasks.items():
        t.name = n
    torch.manual_seed(0)
    model = build_model(arch, tasks, backbone, head)
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.rand(b, 3, h, w, generator=g),
        "semseg": torch.randint(0, 13, (b, h, w), generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
    }
    return model, tasks, batch


class Runner:
    def __init__(self, model, tasks, batch, losses_after: str) -> None:
        self.model, self.tasks, self.batch = model, tasks, batch
        self.snapshot = copy.deepcopy(model.state_dict())
        self.balancer = balancing.create("famo", num_tasks=3, losses_after=losses_after)
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def losses(self, batch):
        preds = self.model(batch["image"])
        return torch.stack([t.loss(preds[n], batch[n]) for n, t in self.tasks.items()])

    def step(self) -> float:
        self.model.load_state_dict(self.snapshot)
        self.opt.zero_grad(set_to_none=True)
        start = time.perf_counter()
        losses = self.losses(self.batch)
        self.balancer.backward(losses, self.model)
        self.opt.step()
        after_step(self.balancer, StepContext(self.batch, self.losses))
        return time.perf_counter() - start


def run(rounds: int = 15, warmup: int = 2) -> dict:
    out = {}
    for name, cfg in CONFIGS.items():
        model, tasks, batch = make(cfg)
        runners = {
            "same_batch": Runner(model, tasks, batch, "same_batch"),
            "next_batch": Runner(copy.deepcopy(model), tasks, batch, "next_batch"),
        }
        times = {k: [] for k in runners}
        ratios = []
        for r in range(warmup + rounds):
            order = ["same_batch", "next_batch"] if r % 2 == 0 else ["next_batch", "same_batch"]
            t = {k: runners[k].step() for k in order}
            if r >= warmup:
                for k, v in t.items():
                    times[k].append(v)
                ratios.append(t["same_batch"] / t["next_batch"])
        out[name] = {
            "median_step_s": {k: statistics.median(v) for k, v in times.items()},
            "median_ratio": statistics.median(ratios),
            "rounds": rounds,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.rounds)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for name, r in res.items():
        s, n = r["median_step_s"]["same_batch"], r["median_step_s"]["next_batch"]
        print(f"{name}: same_batch {s:.4f} s, next_batch {n:.4f} s, "
              f"median ratio {r['median_ratio']:.3f} ({r['rounds']} interleaved rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
