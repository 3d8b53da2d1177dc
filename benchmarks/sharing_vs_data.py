"""When does sharing pay? Δm of hard sharing against single-task networks as the data grows.

    python benchmarks/sharing_vs_data.py --out runs/sharing-vs-data [--jobs 2]
        [--sizes 100,200,500,1000,2000] [--backbones tiny,resnet18] [--methods fixed,graddrop]
        [--seeds 0,1] [--steps 1500] [--size 96x128] [--plot-only]

For every backbone and training-set size it runs one ``mtlcv compare`` grid
(``OUT/<backbone>/n<size>``): single-task networks (``stl``, the baseline) and hard parameter
sharing with each balancer of ``--methods`` (equal weights and, e.g., the best gradient method
of the seed experiment), every seed. All sizes train on prefixes of one scenes cache of 2500
images (``data.options.n_train``), so val and test are the same 250 images for every size, and
every run takes about the same number of optimizer steps (``--steps``; epochs =
steps / (size / batch), rounded up): a small training set is seen for more epochs, as it would be
trained in practice, and every point costs about the same.

Then it writes ``OUT/sharing_vs_data.json`` (every grid's summary rows), ``OUT/sharing_vs_data.md``
(Δm per size, backbone and method: mean ± std over seeds) and ``OUT/sharing_vs_data.png``
(Δm against the training-set size, one line per backbone and method; negative: sharing beats
the single-task networks). ``--plot-only`` redraws them from the finished grids. Finished runs
are reused and interrupted ones resumed, as in ``mtlcv compare``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

#: the experiment every grid starts from (the demo's settings; data size and epochs vary)
BASE: dict[str, Any] = {
    "name": "sharing-vs-data",
    "tasks": ["semseg", "depth", "normals"],
    "data": {"name": "scenes", "batch_size": 8, "augment": True,
             "options": {"n": 2500, "size": [96, 128], "seed": 0}},
    "model": {"arch": "hps", "backbone": {"name": "tiny"}, "head": {"name": "light"}},
    "optim": {"name": "adam", "lr": 1e-3},
    "schedule": {"name": "cosine"},
    "balancer": {"name": "fixed"},
    "train": {"epochs": 1, "progress": False},
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def grid_dir(out: Path, backbone: str, size: int) -> Path:
    return out / backbone / f"n{size}"


def run(args: argparse.Namespace) -> None:
    from mtlcv.config import apply_overrides
    from mtlcv.engine.grid import run_grid

    batch = BASE["data"]["batch_size"]
    h, w = (int(v) for v in args.size.split("x"))
    for backbone in args.backbones.split(","):
        for size in _ints(args.sizes):
            epochs = max(1, math.ceil(args.steps / max(1, size // batch)))
            base = apply_overrides(BASE, [
                f"model.backbone.name={backbone}", f"data.options.n_train={size}",
                f"data.options.size=[{h}, {w}]", f"train.epochs={epochs}",
            ])
            print(f"== {backbone}, {size} training images, {epochs} epochs", flush=True)
            run_grid(base, [("balancer.name", args.methods.split(","))], _ints(args.seeds),
                     grid_dir(args.out, backbone, size), baseline="model.arch=stl",
                     jobs=args.jobs)


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Every grid's rows, recomputed from its runs (as ``mtlcv report`` does)."""
    from mtlcv.analysis.report import directions, grid_rows, load_grid

    out: dict[str, Any] = {}
    for backbone in args.backbones.split(","):
        for size in _ints(args.sizes):
            path = grid_dir(args.out, backbone, size)
            if not (path / "grid.json").is_file():
                continue
            grid = load_grid(path)
            runs = [r for seeds in grid.runs.values() for r in seeds.values()]
            rows = grid_rows(grid, directions(runs))
            out.setdefault(backbone, {})[str(size)] = rows
    return out


def write(args: argparse.Namespace, data: dict[str, Any]) -> None:

    from matplotlib.figure import Figure

    (args.out / "sharing_vs_data.json").write_text(json.dumps(data, indent=1))
    methods = args.methods.split(",")
    lines = ["| backbone | training images | " + " | ".join(f"Δm % HPS {m}" for m in methods)
             + " |", "|---|---|" + "---|" * len(methods)]
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for b, (backbone, sizes) in enumerate(data.items()):
        for k, method in enumerate(methods):
            xs, ys, es = [], [], []
            for size, rows in sorted(sizes.items(), key=lambda kv: int(kv[0])):
                row = next((r for r in rows if r["label"] == method and "delta_m" in r), None)
                if row is not None:
                    xs.append(int(size))
                    ys.append(row["delta_m"])
                    es.append(row["delta_m_std"])
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt="o-" if b == 0 else "s--", capsize=3,
                            color=f"C{k}", label=f"{backbone}, HPS {method}")
        for size, rows in sorted(sizes.items(), key=lambda kv: int(kv[0])):
            cells = []
            for method in methods:
                row = next((r for r in rows if r["label"] == method and "delta_m" in r), None)
                cells.append("—" if row is None else
                             f"{row['delta_m']:+.2f} ± {row['delta_m_std']:.2f}")
            lines.append(f"| {backbone} | {size} | " + " | ".join(cells) + " |")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(sorted({int(s) for sz in data.values() for s in sz}))
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ax.get_xaxis().set_minor_formatter("")
    ax.set_xlabel("training images")
    ax.set_ylabel("Δm % vs single-task networks (< 0: sharing wins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(args.out / "sharing_vs_data.png", dpi=100)
    (args.out / "sharing_vs_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"figure: {args.out / 'sharing_vs_data.png'}")



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/sharing-vs-data"))
    p.add_argument("--sizes", default="100,200,500,1000,2000")
    p.add_argument("--backbones", default="tiny,resnet18")
    p.add_argument("--methods", default="fixed,graddrop",
                   help="balancers of the hard-sharing runs (equal weights first)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per run (about)")
    p.add_argument("--size", default="96x128", help="image size HxW")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    if not args.plot_only:
        run(args)
    write(args, collect(args))


if __name__ == "__main__":
    main()
