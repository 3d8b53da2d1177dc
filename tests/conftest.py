"""Shared fixtures: small, fast experiment configs on a tiny scenes cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nyuv2-fixture"

# the default cache must never be the user's home during tests
os.environ.setdefault("MTLCV_CACHE", str(Path(__file__).resolve().parent / ".cache"))
# one intra-op thread: small convolutions gain little from two, and an OpenMP team of two on a
# busy 2-core machine can run 10x slower than one thread
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def scenes_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small scenes cache shared by the engine tests (48 images at 32x48)."""
    from mtlcv.data.scenes import write_cache

    root = tmp_path_factory.mktemp("scenes")
    write_cache(root, n=48, size=(32, 48), seed=0, progress=False)
    return str(root)


@pytest.fixture
def small_cfg(scenes_root: str) -> dict:
    """A config dict that trains in a second or two per epoch."""
    return small_config(scenes_root)


def small_config(scenes_root: str) -> dict:
    """:func:`small_cfg` as a function (for module-scoped fixtures)."""
    return {
        "name": "small",
        "seed": 0,
        "tasks": ["semseg", "depth", "normals"],
        "data": {
            "name": "scenes",
            "root": scenes_root,
            "batch_size": 4,
            "augment": True,
            "options": {"n": 48, "size": [32, 48], "seed": 0},
        },
        "model": {
            "arch": "hps",
            "backbone": {"name": "tiny", "width": 8},
            "head": {"name": "light"},
        },
        "optim": {"name": "adam", "lr": 1e-3},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 2, "progress": False},
    }
