"""Per-image prediction time of trained models on the CPU (``mtlcv.load(...).predict``).

    python benchmarks/predict_speed.py RUN [RUN ...] [--image 480x640] [--n 24] [--batch 1,8]
                                        [--threads 1] [--repeats 3]

For every run directory (or checkpoint) and batch size, prints the time per image of

* ``forward``: the network alone on a batch at its input size;
* ``predict``: ``Predictor.predict_raw`` on photos of ``--image`` size: resizing in, the
  forward pass and resizing every dense output back to the photo's size.

Each is the median over ``--repeats`` passes over ``--n`` images, as wall-clock time and as the
CPU time of this process: on a shared machine the wall time grows with other load, the CPU time
per image (with ``--threads 1``: the cost of one image on one core) much less.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mtlcv


def _timed(fn, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    fn()  # warm-up: first calls allocate and pick kernels
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or checkpoint files")
    ap.add_argument("--image", default="480x640", help="HxW of the photos (default 480x640)")
    ap.add_argument("--n", type=int, default=24, help="images per pass (default 24)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.image.split("x"))
    gen = torch.Generator().manual_seed(0)
    photos = [torch.rand(3, h, w, generator=gen) for _ in range(args.n)]
    print(f"CPU, {args.threads} thread(s), {args.n} images per pass, median of {args.repeats}")
    for run in args.runs:
        model = mtlcv.load(run, device="cpu")
        params = sum(p.numel() for p in model.model.parameters())
        print(f"{run}: {model} ({params / 1e6:.2f} M parameters)")
        for b in (int(v) for v in args.batch.split(",")):
            print("  " + bench(model, photos, b, args.repeats, gen))


def bench(model, photos: list[torch.Tensor], b: int, repeats: int, gen) -> str:  # noqa: ANN001
    """One line: forward and predict time per image at batch size ``b``."""
    size, (h, w), n = model.input_size, photos[0].shape[-2:], len(photos)
    x = torch.rand(b, 3, *size, generator=gen)
    steps = max(1, n // b)

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                model.model(x)

    fw, fc = _timed(forward, repeats)
    pw, pc = _timed(lambda: model.predict_raw(photos, batch_size=b), repeats)
    return (
        f"batch {b}: forward at {size[0]}x{size[1]} {1e3 * fw / (steps * b):.1f} ms/image "
        f"({1e3 * fc / (steps * b):.1f} ms CPU); predict on {h}x{w} photos "
        f"{1e3 * pw / n:.1f} ms/image ({1e3 * pc / n:.1f} ms CPU)"
    )

if __name__ == "__main__":
    main()
