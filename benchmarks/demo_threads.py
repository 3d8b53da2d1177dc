"""The demo's training step under thread counts and OpenMP wait policies, quiet and under load
(project issue 14, item 5).

    python benchmarks/demo_threads.py [--steps 20] [--json OUT]

For every thread count (1, 2, PyTorch's default) x ``OMP_WAIT_POLICY`` (passive, active), a
fresh process (the policy is read once, when OpenMP starts) trains the demo's HPS configuration
(``mtlcv.demo.DEMO``: scenes 96x128, batch 8, tiny backbone) for ``--steps`` steps; the time
per step is the run's ``train_time_s / steps`` (training only, no evaluation). Each
combination runs quiet and then under load: two busy processes (``while 1: pass``) started
before and ended after it, as two other jobs on a 2-core laptop would. ``/proc/loadavg`` is
recorded before every measurement. Slow-down = loaded / quiet step time; "proportional" on 2
cores with 2 extra busy processes is 2x (the run gets about a third of 2 cores instead of 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD = r"""
import json, sys
from mtlcv.config import apply_overrides, from_dict
from mtlcv.demo import demo_base
from mtlcv.engine.trainer import Trainer
steps, threads, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
over = ["model.arch=hps", "train.epochs=1", f"train.max_steps={steps}", "train.progress=false"]
if threads != "default":
    over.append(f"train.threads={threads}")
cfg = from_dict(apply_overrides(demo_base(), over))
import torch
tr = Trainer(cfg, out, log=lambda s: None)
tr.fit(stop_after_epoch=1)
rec = json.loads(open(out + "/metrics.jsonl").read().splitlines()[-1])
print(json.dumps({"step_s": rec["train_time_s"] / rec["steps"], "steps": rec["steps"],
                  "torch_threads": torch.get_num_threads()}))
"""


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


def one(steps: int, threads: str, policy: str, loaded: bool) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    env.pop("OMP_NUM_THREADS", None)
    busy = []
    if loaded:
        busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
        time.sleep(1.0)
    la = loadavg()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(steps), threads,
                                   str(Path(tmp) / "run")], capture_output=True, text=True,
                                  env=env, timeout=1800)
    finally:
        for p in busy:  # only the processes started here
            p.kill()
            p.wait()
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["loadavg"] = la
    return rec


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: the busy processes end too


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", nargs="+", default=["1", "2", "default"])
    ap.add_argument("--policies", nargs="+", default=["passive", "active"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"steps": args.steps, "cpu": os.cpu_count(), "runs": []}
    for threads in args.threads:
        for policy in args.policies:
            row: dict[str, Any] = {"threads": threads, "policy": policy}
            for cond in ("quiet", "load"):
                row[cond] = one(args.steps, threads, policy, cond == "load")
            q, ld = row["quiet"].get("step_s"), row["load"].get("step_s")
            row["slowdown"] = ld / q if q and ld else None
            res["runs"].append(row)
            print(f"threads {threads:>7} {policy:>7}: quiet {q and q * 1e3:.0f} ms/step "
                  f"(load avg {row['quiet'].get('loadavg')}), under load {ld and ld * 1e3:.0f} "
                  f"ms/step (load avg {row['load'].get('loadavg')}), slow-down "
                  f"{row['slowdown'] and round(row['slowdown'], 2)}x", flush=True)
            if args.json:
                args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
