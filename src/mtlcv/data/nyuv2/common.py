"""What every NYUv2 layout shares: value checks, split selection, and the sample assembly.

Each layout only has to :meth:`NYUv2Dataset.read` one frame as NumPy arrays (already checked by
the ``as_*`` helpers, which raise a one-line :class:`~mtlcv.errors.DataError` naming the file
and the problem); this base turns them into the batch contract of :mod:`mtlcv.data.base`,
fills a target the frame lacks with its ignore/missing value, and resizes and augments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError, DataError
from ..base import MTLDataset
from ..transforms import augment as augment_sample
from ..transforms import resize

IGNORE = 255
SPLITS = ("train", "val", "test")
CLASSES13 = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
    "table", "tv", "wall", "window",
)  # fmt: skip


def load_npy(path: Path) -> np.ndarray:
    """``np.load`` that turns a missing, truncated or non-array file into a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable or truncated .npy ({reason})") from None


def _hw(a: np.ndarray, where: Any, channels: int | None, what: str) -> np.ndarray:
    """Check ``a`` is ``H×W`` (channels None) or ``H×W×channels`` (a trailing 1 is dropped)."""
    if channels is None and a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    ok = a.ndim == 2 if channels is None else (a.ndim == 3 and a.shape[-1] == channels)
    if not ok:
        want = "H×W" if channels is None else f"H×W×{channels}"
        raise DataError(f"{where}: {what} has shape {a.shape}, expected {want}")
    if a.dtype.kind not in "fiub":
        raise DataError(f"{where}: {what} has dtype {a.dtype}, expected a numeric array")
    if 0 in a.shape[:2]:
        raise DataError(f"{where}: {what} has shape {a.shape}, an empty image")
    return a


def as_image(a: np.ndarray, where: Any) -> np.ndarray:
    """RGB ``H×W×3`` as float32 in [0, 1]; uint8 is divided by 255, floats must be in [0, 1]."""
    a = _hw(a, where, 3, "image")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{where}: image has NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DataError(f"{where}: image values span [{lo:g}, {hi:g}], expected [0, 1]")
    return a.clip(0.0, 1.0)


def as_labels(a: np.ndarray, where: Any, num_classes: int = 13) -> np.ndarray:
    """Class ids ``H×W`` as int64 with 255 = ignore; −1 (the mtan release) and 255 are ignore."""
    a = _hw(a, where, None, "label")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise DataError(f"{where}: label has NaN or infinite values")
        if (a != np.round(a)).any():
            raise DataError(f"{where}: label has non-integer values, expected class ids")
    a = a.astype(np.int64)
    a[(a == -1) | (a == IGNORE)] = IGNORE
    bad = a[(a != IGNORE) & ((a < 0) | (a >= num_classes))]
    if bad.size:
        raise DataError(
            f"{where}: label id {int(bad[0])} is outside [0, {num_classes}) and is not the "
            f"ignore value (-1 or {IGNORE})"
        )
    return a


def as_depth(a: np.ndarray, where: Any) -> np.ndarray:
    """Metric depth ``H×W`` (or ``H×W×1``) as float32; 0 = missing; NaN/inf/negative rejected."""
    a = _hw(a, where, None, "depth").astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{where}: depth has NaN or infinite values (use 0 for missing)")
    if (a < 0).any():
        raise DataError(f"{where}: depth has negative values (min {float(a.min()):g})")
    return a


def as_normals(a: np.ndarray, where: Any) -> np.ndarray:
    """Normals ``H×W×3`` as float32 unit vectors; all-zero = missing.

    Non-zero vectors are renormalised (interpolated releases are only nearly unit); lengths
    above 1.5 mean the file holds something else (e.g. 0..255 colours) and are rejected.
    """
    a = _hw(a, where, 3, "normal").astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{where}: normal has NaN or infinite values (use 0 for missing)")
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    if norm.max(initial=0.0) > 1.5:
        raise DataError(
            f"{where}: normal vectors have length up to {float(norm.max()):g}, expected unit "
            "vectors or 0 (missing)"
        )
    return np.where(norm > 1e-3, a / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def check_split(split: str, where: str = "dataset") -> None:
    """Raise a ConfigError naming the valid splits when ``split`` is not one of them."""
    if split not in SPLITS:
        raise ConfigError(f"{where}: unknown split {split!r}; valid: {', '.join(SPLITS)}")


def select_split(
    split: str,
    train: np.ndarray,
    test: np.ndarray,
    val_fraction: float = 0.0,
    val_seed: int = 0,
    where: str = "dataset",
) -> np.ndarray:
    """Frame ids of ``split`` given the official ``train`` and ``test`` ids.

    The published NYUv2 numbers (mtan, CAGrad, Nash-MTL, FAMO, LibMTL) are measured on the 654
    official test frames, which those releases call ``val``; so ``val`` and ``test`` both give
    the test frames. With ``0 < val_fraction < 1``, ``val`` instead holds out that fraction of
    the training frames (a seeded random subset) and ``train`` loses them.
    """
    check_split(split, where)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"{where}: val_fraction must be in [0, 1), got {val_fraction}")
    train, test = np.asarray(train), np.asarray(test)
    if split == "test" or (split == "val" and val_fraction == 0):
        return test
    n_val = max(1, round(val_fraction * len(train))) if val_fraction > 0 else 0
    held = np.random.default_rng(val_seed).permutation(len(train))[:n_val]
    mask = np.zeros(len(train), bool)
    mask[held] = True
    return np.sort(train[mask] if split == "val" else train[~mask])


class NYUv2Dataset(MTLDataset):
    """Base of the NYUv2 layouts (Silberman et al., ECCV 2012): semseg (13 or 40 classes), depth
    (metres) and surface normals, mapped to the batch contract.

    Attributes: ``targets``; ``task_options``; ``has[task]``, a bool array saying which samples
    carry that target (the others are filled with 255 / 0 so loss and metrics mask them);
    ``normals_source``: ``"ground truth"`` or ``"derived"`` (normals computed from depth, not
    comparable to published normal numbers); ``ids``: the frames of this split.
    """

    targets: tuple[str, ...] = ("semseg", "depth", "normals")
    normals_source = "ground truth"

    def __init__(
        self,
        ids: np.ndarray,
        augment: bool = False,
        size: Sequence[int] | None = None,
        num_classes: int = 13,
    ) -> None:
        self.ids = np.asarray(ids)
        self.augment = bool(augment)
        if size is not None and (len(size) != 2 or min(int(s) for s in size) < 1):
            raise ConfigError(f"dataset option 'size': expected [H, W], got {size!r}")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.num_classes = num_classes
        self.task_options = {"semseg": {"num_classes": num_classes}}
        self.class_names = {"semseg": list(CLASSES13)} if num_classes == 13 else {}
        self.has = {t: np.ones(len(self.ids), bool) for t in self.targets}

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int) -> dict[str, np.ndarray | None]:  # pragma: no cover - abstract
        """Frame ``i`` of the split: ``image`` H×W×3 in [0, 1], ``semseg`` H×W int64,
        ``depth`` H×W, ``normals`` H×W×3 (checked); ``None`` for a target it lacks."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        raw = self.read(int(i) % len(self))
        h, w = raw["image"].shape[:2]
        for key in self.targets:
            if raw.get(key) is not None and raw[key].shape[:2] != (h, w):
                raise DataError(
                    f"{self.describe(i)}: {key} is {raw[key].shape[:2]}, image is {(h, w)}"
                )
        sample = {"image": torch.from_numpy(np.ascontiguousarray(raw["image"])).permute(2, 0, 1)}
        fill = {
            "semseg": lambda: torch.full((h, w), IGNORE, dtype=torch.long),
            "depth": lambda: torch.zeros(1, h, w),
            "normals": lambda: torch.zeros(3, h, w),
        }
        for key in self.targets:
            v = raw.get(key)
            if v is None:
                sample[key] = fill[key]()
            elif key == "semseg":
                sample[key] = torch.from_numpy(v.astype(np.int64))
            else:
                t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                sample[key] = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        sample = {k: v.contiguous() for k, v in sample.items()}
        if self.size is not None and self.size != (h, w):
            sample = resize(sample, self.size)
        if self.augment:
            sample = augment_sample(sample)
        return sample

    def describe(self, i: int) -> str:
        """Where frame ``i`` comes from (for error messages)."""
        return f"{type(self).__name__} frame {int(self.ids[i])}"
