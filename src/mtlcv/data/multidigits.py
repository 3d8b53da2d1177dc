"""MultiDigits: two handwritten digits overlaid in one image; tasks = the left and the right digit.

A real-image multi-task benchmark that needs no download, built from the UCI optical
handwritten digits bundled with scikit-learn (1,797 8×8 grey-level scans of 43 writers' digits)
in the manner of Multi-MNIST: Sabour, Frosst & Hinton, "Dynamic routing between capsules",
NeurIPS 2017, Sec. 6 (two digits, each shifted at random, overlaid in one image), and Sener &
Koltun, "Multi-task learning as multi-objective optimization", NeurIPS 2018, Sec. 7.1 (one digit
towards the top-left, one towards the bottom-right; task L classifies the first, task R the
second).

Construction of an image (every step a deterministic function of ``seed``):

1. The 1,797 digits are split once into disjoint train / val / test pools (60 / 20 / 20 %,
   stratified by digit), so no scanned digit of the test split is ever seen in training.
2. Every digit is enlarged from 8×8 to ``digit_size`` × ``digit_size`` pixels by bilinear
   interpolation (values in [0, 1]).
3. A pair of digits is drawn at random from the split's pool. The left digit is placed at
   ``(dy, dx)``, the right one at ``(size - digit_size - dy', size - digit_size - dx')``, each
   offset uniform in ``0 .. shift``; where they overlap the brighter pixel wins (maximum).
4. The grey image is repeated over three channels (the batch contract's ``image`` [3, H, W]).

Targets: ``left`` and ``right`` (10 classes each) and ``sum`` (left + right, 19 classes), all
declared as ``classification`` tasks (``task_kinds``). Defaults: 32×32 images, 20-pixel digits,
shifts up to 4 pixels (the digits overlap over roughly a third of their area), 6,000 images
(4,800 / 600 / 600).

Augmentation (``augment=True``, training split): the whole image is translated by up to 2
pixels in each direction (zero fill), drawn from the torch RNG. A horizontal flip would swap
the meaning of left and right, so there is none.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import DATASETS
from .base import MTLDataset

__all__ = ["MultiDigitsDataset", "compose", "multidigits"]

SPLITS = ("train", "val", "test")
POOL_FRACTIONS = (0.6, 0.2, 0.2)


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
            low <= value <= high):
        raise ConfigError(f"multidigits option {name!r}: expected an integer in [{low}, {high}], "
                          f"got {value!r}")
    return int(value)


def _pools(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Disjoint, digit-stratified train/val/test pools of the bundled digits' indices."""
    rng = np.random.default_rng([seed, 0])
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        a = round(POOL_FRACTIONS[0] * len(idx))
        b = a + round(POOL_FRACTIONS[1] * len(idx))
        for split, part in zip(SPLITS, (idx[:a], idx[a:b], idx[b:])):
            pools[split].append(part)
    return {s: np.sort(np.concatenate(p)) for s, p in pools.items()}


def compose(n: int, split: str = "train", size: int = 32, digit_size: int = 20, shift: int = 4,
            seed: int = 0) -> dict[str, np.ndarray]:
    """The ``n`` images of ``split``: ``image`` uint8 [n, H, W] (grey), ``left``, ``right``,
    ``sum`` int64 [n]; a deterministic function of its arguments.

    Example:
        >>> out = compose(4, size=24, digit_size=16, seed=0)
        >>> out["image"].shape, out["sum"].tolist() == (out["left"] + out["right"]).tolist()
        ((4, 24, 24), True)
    """
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ConfigError(f"multidigits: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    digits = load_digits()
    pool = _pools(digits.target, seed)[split]
    big = F.interpolate(torch.from_numpy(digits.images[pool] / 16.0)[:, None], size=(
        digit_size, digit_size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
    pick = rng.integers(0, len(pool), size=(n, 2))
    off = rng.integers(0, shift + 1, size=(n, 4))
    far = size - digit_size
    image = np.zeros((n, size, size))
    for i in range(n):  # 6,000 small pastes take ~30 ms
        y0, x0, y1, x1 = off[i, 0], off[i, 1], far - off[i, 2], far - off[i, 3]
        image[i, y0:y0 + digit_size, x0:x0 + digit_size] = big[pick[i, 0]]
        region = image[i, y1:y1 + digit_size, x1:x1 + digit_size]
        np.maximum(region, big[pick[i, 1]], out=region)
    left, right = digits.target[pool[pick[:, 0]]], digits.target[pool[pick[:, 1]]]
    return {"image": np.round(image * 255).astype(np.uint8), "left": left.astype(np.int64),
            "right": right.astype(np.int64), "sum": (left + right).astype(np.int64)}


class MultiDigitsDataset(MTLDataset):
    """One split of MultiDigits, generated in memory (see the module docstring)."""

    targets = ("left", "right", "sum")
    task_kinds = {"left": "classification", "right": "classification", "sum": "classification"}
    task_options = {"left": {"num_classes": 10}, "right": {"num_classes": 10},
                    "sum": {"num_classes": 19}}

    def __init__(self, n: int, split: str = "train", augment: bool = False, size: int = 32,
                 digit_size: int = 20, shift: int = 4, seed: int = 0) -> None:
        self.split, self.augment = split, augment
        arrays = compose(n, split, size, digit_size, shift, seed)
        self.images = torch.from_numpy(arrays.pop("image"))
        self.labels = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = (self.images[i].float() / 255).expand(3, -1, -1)
        if self.augment:  # torch RNG: torch.manual_seed reproduces it
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,)))
            image = torch.roll(image, (dy, dx), dims=(1, 2))
            if dy > 0:
                image[:, :dy] = 0
            elif dy < 0:
                image[:, dy:] = 0
            if dx > 0:
                image[:, :, :dx] = 0
            elif dx < 0:
                image[:, :, dx:] = 0
        return {"image": image.contiguous(), **{k: v[i].clone() for k, v in self.labels.items()}}


def split_sizes(n: int) -> dict[str, int]:
    """80 / 10 / 10 % of ``n`` images for train / val / test (at least one each)."""
    val = test = max(1, round(0.1 * n))
    return {"train": n - val - test, "val": val, "test": test}


@DATASETS.register("multidigits",
                   help="two bundled handwritten digits per image; tasks left, right, sum")
def multidigits(split: str = "train", root: str | None = None, augment: bool = False,
                n: int = 6000, size: int = 32, digit_size: int = 20, shift: int = 4,
                seed: int = 0) -> MultiDigitsDataset:
    """MultiDigits, generated in memory from scikit-learn's bundled digits (``root`` unused)."""
    if split not in SPLITS:
        raise ConfigError(f"multidigits: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    n = _int("n", n, 3, 10_000_000)
    size = _int("size", size, 8, 1024)
    digit_size = _int("digit_size", digit_size, 4, size)
    shift = _int("shift", shift, 0, size - digit_size)
    seed = _int("seed", seed, 0, 2**32 - 1)
    if root is not None:
        raise ConfigError("config key 'data.root': multidigits is generated in memory from the "
                          "digits bundled with scikit-learn; remove data.root")
    return MultiDigitsDataset(split_sizes(n)[split], split, augment, size, digit_size, shift,
                              seed)
