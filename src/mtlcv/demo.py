"""``mtlcv demo``: single-task baselines vs hard parameter sharing on the embedded scenes data.

Trains, at the same number of epochs, the single-task networks (``stl``, the baselines) and a
hard-parameter-sharing network (``hps``) with equal loss weights, then prints the per-task test
metrics of both and Δm. Everything runs on CPU in a few minutes; the data is rendered on first
use and cached.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import from_dict, load, to_dict
from .errors import ConfigError

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
    "train": {"epochs": 12},
    "seed": 0,
}


def demo_configs(epochs: int | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The validated configs of the demo's two runs, ``{"stl": cfg, "hps": cfg}``."""
    from .config import apply_overrides

    out = {}
    for arch in ("stl", "hps"):
        data = copy.deepcopy(DEMO)
        data["name"] = f"demo-{arch}"
        data["model"]["arch"] = arch
        if epochs is not None:
            data["train"]["epochs"] = epochs
        out[arch] = from_dict(apply_overrides(data, overrides or []))
    return out


def run_demo(
    out_dir: str | Path = "runs/demo",
    epochs: int | None = None,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Train STL then HPS into ``out_dir/{stl,hps}``; return both results dicts.

    The HPS run selects its best epoch by Δm on val against the STL run.
    """
    from .engine.trainer import train

    out = Path(out_dir)
    cfgs = demo_configs(epochs, overrides)
    results = {}
    for arch, cfg in cfgs.items():
        run = out / arch
        if arch == "hps":
            cfg.baselines = str(out / "stl")
        if (run / "results.json").is_file() and (run / "config.yaml").is_file():
            if to_dict(load(run / "config.yaml")) != to_dict(cfg):
                raise ConfigError(
                    f"{str(run)!r} holds a finished demo run with other settings; "
                    "choose another --out"
                )
            log(f"[demo] {arch}: reusing the finished run in {run}")
            results[arch] = json.loads((run / "results.json").read_text())
            continue
        resume = (run / "last.pt").is_file()
        log(f"[demo] training {arch} ({cfg.train.epochs} epochs) -> {run}")
        results[arch] = train(cfg, run, resume=resume, log=log)
    return results
