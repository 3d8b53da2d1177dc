"""Rendering speed of the procedural scenes dataset (images per second, one process).

    python benchmarks/render_speed.py [--n 500] [--size 96x128] [--workers 2]

Prints the wall-clock rate and the CPU time per image: on a shared machine the wall rate drops
with other load, while the CPU time per image (the cost of one image on one core) does not.
"""

from __future__ import annotations

import argparse
import time

from mtlcv.data import scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", default="96x128", help="HxW")
    ap.add_argument("--workers", type=int, default=scenes._WORKERS,
                    help="rendering threads (default: one per core, at most 4)")
    args = ap.parse_args()
    size = tuple(int(s) for s in args.size.split("x"))
    scenes._WORKERS = args.workers
    scenes.render(64, size=size, seed=1)  # warm-up: first calls allocate and load kernels
    wall, cpu = time.perf_counter(), time.process_time()
    scenes.render(args.n, size=size, seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"scenes {size[0]}x{size[1]}, {args.n} images, {args.workers} worker(s): "
          f"{args.n / wall:.0f} images/s, {1e3 * cpu / args.n:.2f} ms CPU per image")


if __name__ == "__main__":
    main()
