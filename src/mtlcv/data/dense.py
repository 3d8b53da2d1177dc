"""What the dense benchmarks beyond NYUv2 share: reading images and label PNGs, value checks,
and the assembly of one sample in the batch contract (:mod:`mtlcv.data.base`).

A dataset lists its targets with their *layout* (:data:`LAYOUTS`) and implements ``read(i)``
returning NumPy arrays (``None`` for a target a sample lacks); :class:`DenseDataset` fills missing
targets with their ignore value, resizes every entry to ``size`` (labels and maps nearest, image
and normals bilinear, :func:`~mtlcv.data.transforms.resize`) and applies a horizontal flip when
``augment`` is on (normals' x negated).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import MTLDataset
from .transforms import hflip, resize

IGNORE = 255
#: how a target is stored in a sample, and what fills it when a sample lacks it
LAYOUTS = {
    "labels": ("[H,W] long", lambda h, w: torch.full((h, w), IGNORE, dtype=torch.long)),
    "binary": ("[1,H,W] float in {0,1}", lambda h, w: torch.full((1, h, w), float(IGNORE))),
    "map": ("[1,H,W] float, 0 = missing", lambda h, w: torch.zeros(1, h, w)),
    "vectors": ("[3,H,W] float, 0 = missing", lambda h, w: torch.zeros(3, h, w)),
}


def read_image(path: Path) -> np.ndarray:
    """An RGB image file as ``H x W x 3`` float32 in [0, 1] (a DataError naming the file)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({str(e).splitlines()[0]})") from None


def read_png(path: Path) -> np.ndarray:
    """A single-channel PNG (8 or 16 bit) as an integer ``H x W`` array, values untouched."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable PNG ({str(e).splitlines()[0]})") from None
    if a.ndim != 2:
        raise DataError(f"{path}: expected a single-channel PNG, got shape {a.shape}")
    return a.astype(np.int64)


def check_labels(a: np.ndarray, where: Any, num_classes: int) -> np.ndarray:
    bad = a[(a != IGNORE) & ((a < 0) | (a >= num_classes))]
    if bad.size:
        raise DataError(f"{where}: label id {int(bad[0])} is outside [0, {num_classes}) and is "
                        f"not the ignore value {IGNORE}")
    return a.astype(np.int64)


def check_size(size: Sequence[int] | None, where: str) -> tuple[int, int] | None:
    if size is None:
        return None
    ok = isinstance(size, (list, tuple)) and len(size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    if not ok:
        raise ConfigError(f"{where}: option 'size' must be [H, W], got {size!r}")
    return int(size[0]), int(size[1])


class DenseDataset(MTLDataset):
    """Base of the folder datasets: ``layouts`` maps each target to a key of :data:`LAYOUTS`."""

    layouts: dict[str, str] = {}

    def __init__(self, augment: bool = False, size: tuple[int, int] | None = None) -> None:
        self.augment = bool(augment)
        self.size = size

    def read(self, i: int) -> dict[str, np.ndarray | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"{type(self).__name__} item {i}"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = int(i) % len(self)
        raw = self.read(i)
        h, w = raw["image"].shape[:2]
        sample = {"image": torch.from_numpy(np.ascontiguousarray(raw["image"])).permute(2, 0, 1)}
        for key in self.targets:
            v = raw.get(key)
            layout = self.layouts[key]
            if v is not None and v.shape[:2] != (h, w):
                raise DataError(f"{self.describe(i)}: {key} is {v.shape[:2]}, image is {(h, w)}")
            if v is None:
                sample[key] = LAYOUTS[layout][1](h, w)
            elif layout == "labels":
                sample[key] = torch.from_numpy(v.astype(np.int64))
            elif layout == "vectors":
                sample[key] = torch.from_numpy(np.ascontiguousarray(v, np.float32)).permute(2, 0, 1)
            else:
                sample[key] = torch.from_numpy(np.ascontiguousarray(v, np.float32))[None]
        sample = {k: v.contiguous() for k, v in sample.items()}
        if self.size is not None and self.size != (h, w):
            sample = resize(sample, self.size)
        if self.augment and bool(torch.rand(()) < 0.5):
            sample = hflip(sample)
        return sample
