"""``mtlcv demo``: single-task baselines vs hard parameter sharing on the embedded scenes data.

Trains, at the same number of epochs, the single-task networks (``stl``, the baselines) and a
hard-parameter-sharing network (``hps``) with equal loss weights, then prints the per-task test
metrics of both and Δm. Everything runs on CPU in a few minutes; the data is rendered on first
use and cached.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import apply_overrides, from_dict

#: the demo's two architectures: the single-task baselines first, then hard sharing
ARCHS = ("stl", "hps")

#: the demo experiment; ``configs/scenes/hps.yaml`` and ``stl.yaml`` hold the same settings
DEMO: dict[str, Any] = {
    "tasks": ["semseg", "depth", "normals"],
    "data": {
        "name": "scenes",
        "batch_size": 8,
        "augment": True,
        "options": {"n": 600, "size": [96, 128], "seed": 0},
    },
    "model": {"backbone": {"name": "tiny"}, "head": {"name": "light"}},
    "optim": {"name": "adam", "lr": 1e-3},
    "schedule": {"name": "cosine"},
    "balancer": {"name": "fixed"},
    "train": {"epochs": 6},
    "seed": 0,
}


def demo_base(epochs: int | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The demo's base config (architecture not yet chosen) with the user's overrides."""
    data = copy.deepcopy(DEMO)
    data["name"] = "demo"
    if epochs is not None:
        data["train"]["epochs"] = epochs
    return apply_overrides(data, overrides or [])


def demo_configs(epochs: int | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The validated configs of the demo's two runs, ``{"stl": cfg, "hps": cfg}``."""
    base = demo_base(epochs, overrides)
    return {a: from_dict(apply_overrides(base, [f"model.arch={a}"])) for a in ARCHS}


def run_demo(
    out_dir: str | Path = "runs/demo",
    epochs: int | None = None,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Train STL then HPS into ``out_dir/{stl,hps}/seed<s>``; return both results dicts.

    A two-run grid (:mod:`mtlcv.engine.grid`): finished runs are reused, interrupted ones
    resumed, and the HPS run selects its best epoch by Δm on val against the STL run.
    """
    from .engine.grid import run_grid

    base = demo_base(epochs, overrides)
    seed = int(base.get("seed", 0))
    variants, _ = run_grid(
        base, [("model.arch", list(ARCHS))], [seed], out_dir, baseline="model.arch=stl", log=log
    )
    return {
        v.label: v.runs[seed] | {"run_dir": str(Path(out_dir) / v.label / f"seed{seed}")}
        for v in variants
    }
