"""Layout (b): the official labeled file ``nyu_depth_v2_labeled.mat`` (Silberman et al.,
ECCV 2012) with the official ``splits.mat`` and a user-given class mapping.

* ``nyu_depth_v2_labeled.mat`` is MATLAB v7.3 (HDF5). h5py shows MATLAB's arrays with their
  axes reversed: ``images`` (N, 3, 640, 480) uint8, ``depths`` (N, 640, 480) float32 metres
  (in-painted), ``labels`` (N, 640, 480) uint16 with 0 = unlabelled and 1..894 = class ids.
* ``splits.mat`` holds ``trainNdxs`` (795) and ``testNdxs`` (654), 1-based frame numbers.
* The class mapping is a vector of 895 entries (``.npy``, ``.txt`` or ``.mat`` with one numeric
  variable): entry k is the class (0-based, < ``num_classes``) of NYU label k, entry 0 is for
  unlabelled pixels; 255 or any negative value means ignore. docs/datasets.md shows how to
  build it from the 13- and 40-class mappings of Couprie et al. (ICLR 2013) and Gupta et al.
  (CVPR 2013).
* Surface normals: ``normals_dir/{k}.npy`` (k = 1-based frame number, H×W×3 at the file's
  resolution, camera frame x right / y down / z forward, 0 = missing) when given; otherwise
  derived from depth (:func:`~.geometry.normals_from_depth`) and flagged
  ``normals_source = "derived"``: not comparable with published normal numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from ...errors import ConfigError, DataError
from ...registry import DATASETS
from .common import (
    IGNORE,
    NYUv2Dataset,
    as_depth,
    as_image,
    as_normals,
    load_npy,
    select_split,
)
from .geometry import NYU_INTRINSICS, normals_from_depth
from .matfile import read_mat

FIELDS = ("images", "depths", "labels")
NUM_RAW_CLASSES = 894


def check_labeled_file(path: Path) -> tuple[int, int, int]:
    """``(N, H, W)`` of the labeled .mat file after checking its fields (else a DataError)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected nyu_depth_v2_labeled.mat)")
    if not h5py.is_hdf5(path):
        raise DataError(f"{path}: not a MATLAB v7.3 (HDF5) file like nyu_depth_v2_labeled.mat")
    with h5py.File(path, "r") as f:
        missing = [k for k in FIELDS if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise DataError(
                f"{path}: missing field(s) {', '.join(missing)} (expected {', '.join(FIELDS)})"
            )
        shapes = {k: f[k].shape for k in FIELDS}
    n, c, w, h = shapes["images"] if len(shapes["images"]) == 4 else (0, 0, 0, 0)
    if c != 3 or shapes["depths"] != (n, w, h) or shapes["labels"] != (n, w, h):
        raise DataError(
            f"{path}: field shapes {shapes} are inconsistent; expected images (N, 3, W, H), "
            "depths and labels (N, W, H)"
        )
    return n, h, w


def load_splits(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based ``(train, test)`` frame ids from the official ``splits.mat`` (1-based)."""
    v = read_mat(path)
    missing = [k for k in ("trainNdxs", "testNdxs") if k not in v]
    if missing:
        raise DataError(f"{path}: missing field(s) {', '.join(missing)} (expected splits.mat)")
    train, test = (np.asarray(v[k]).ravel().astype(np.int64) - 1 for k in ("trainNdxs", "testNdxs"))
    for name, ids in (("trainNdxs", train), ("testNdxs", test)):
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise DataError(f"{path}: {name} has frame numbers outside 1..{n}")
    if np.intersect1d(train, test).size:
        raise DataError(f"{path}: trainNdxs and testNdxs share frames")
    return train, test


def load_mapping(path: str | Path, num_classes: int = 13) -> np.ndarray:
    """The 895-entry class mapping (see the module docstring) as int64 with 255 = ignore."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: class mapping file not found")
    try:
        if path.suffix == ".npy":
            m = load_npy(path)
        elif path.suffix == ".mat":
            found = read_mat(path)
            if len(found) != 1 and "mapping" not in found:
                raise DataError(
                    f"{path}: expected one numeric variable (or one named 'mapping'), found "
                    f"{', '.join(found) or 'none'}"
                )
            m = found.get("mapping", next(iter(found.values()), None))
        else:
            m = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=1)
    except ValueError as e:
        raise DataError(f"{path}: unreadable class mapping ({e})") from None
    m = np.asarray(m).ravel()
    if m.size != NUM_RAW_CLASSES + 1 or m.dtype.kind not in "fiu":
        raise DataError(
            f"{path}: class mapping has {m.size} entries, expected {NUM_RAW_CLASSES + 1} numbers "
            "(index 0 = unlabelled, 1..894 = NYU class ids)"
        )
    if m.dtype.kind == "f" and (~np.isfinite(m) | (m != np.round(m))).any():
        raise DataError(f"{path}: class mapping has non-integer entries")
    m = m.astype(np.int64)
    m[(m < 0) | (m == IGNORE)] = IGNORE
    bad = m[(m != IGNORE) & (m >= num_classes)]
    if bad.size:
        raise DataError(
            f"{path}: class mapping has class {int(bad[0])}, expected 0..{num_classes - 1} or "
            f"{IGNORE}/-1 (ignore)"
        )
    m[0] = IGNORE
    return m


class NYUv2Mat(NYUv2Dataset):
    """NYUv2 from the official labeled .mat file (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        augment: bool = False,
        mapping: str | Path | None = None,
        splits: str | Path | None = None,
        num_classes: int = 13,
        normals_dir: str | Path | None = None,
        size: Sequence[int] | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
    ) -> None:
        path = Path(root).expanduser()
        if path.is_dir():
            path = path / "nyu_depth_v2_labeled.mat"
        n, h, w = check_labeled_file(path)
        if mapping is None:
            raise ConfigError(
                "config key 'data.options.mapping': dataset 'nyuv2-mat' needs the 895-entry "
                "class mapping file (see docs/datasets.md)"
            )
        self.path, self.shape = path, (h, w)
        self.mapping = load_mapping(mapping, num_classes)
        splits = Path(splits).expanduser() if splits else path.parent / "splits.mat"
        train, test = load_splits(splits, n)
        ids = select_split(split, train, test, val_fraction, val_seed, "dataset 'nyuv2-mat'")
        super().__init__(ids, augment, size, num_classes)
        self.normals_dir = None if normals_dir is None else Path(normals_dir).expanduser()
        if self.normals_dir is None:
            self.normals_source = "derived"
        else:
            if not self.normals_dir.is_dir():
                raise DataError(f"{self.normals_dir}: normals folder not found")
            self.has["normals"] = np.array([self._normal_file(k).is_file() for k in self.ids])
        self._file: h5py.File | None = None
        self._pid = 0

    def _normal_file(self, k: int) -> Path:
        return self.normals_dir / f"{int(k) + 1}.npy"

    def __getstate__(self) -> dict:
        # an open HDF5 handle must not cross into DataLoader worker processes
        return {**self.__dict__, "_file": None}

    def read(self, i: int) -> dict[str, np.ndarray | None]:
        if self._file is None or self._pid != os.getpid():  # reopen in forked workers too
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        k, f = int(self.ids[i]), self._file
        where = f"{self.path} frame {k + 1}"
        image = as_image(np.asarray(f["images"][k]).transpose(2, 1, 0), where)
        depth = as_depth(np.asarray(f["depths"][k]).T, where)
        raw = np.asarray(f["labels"][k]).T.astype(np.int64)
        if raw.min() < 0 or raw.max() > NUM_RAW_CLASSES:
            raise DataError(f"{where}: label id {int(raw.max())} is outside 0..{NUM_RAW_CLASSES}")
        if self.normals_dir is None:
            normals = normals_from_depth(torch.from_numpy(depth), NYU_INTRINSICS).permute(1, 2, 0)
            normals = normals.numpy()
        elif self.has["normals"][i]:
            p = self._normal_file(k)
            normals = as_normals(load_npy(p), p)
        else:
            normals = None
        return {"image": image, "semseg": self.mapping[raw], "depth": depth, "normals": normals}

    def describe(self, i: int) -> str:
        return f"{self.path} frame {int(self.ids[i]) + 1}"


@DATASETS.register("nyuv2-mat")
def nyuv2_mat(
    split: str = "train",
    root: str | None = None,
    augment: bool = False,
    mapping: str | None = None,
    splits: str | None = None,
    num_classes: int = 13,
    normals_dir: str | None = None,
    size: Sequence[int] | None = None,
    val_fraction: float = 0.0,
    val_seed: int = 0,
) -> NYUv2Mat:
    """NYUv2 from the official nyu_depth_v2_labeled.mat + splits.mat + a class mapping file."""
    if root is None:
        raise ConfigError(
            "config key 'data.root': dataset 'nyuv2-mat' needs the path of "
            "nyu_depth_v2_labeled.mat (see docs/datasets.md)"
        )
    return NYUv2Mat(
        root,
        split,
        augment,
        mapping,
        splits,
        num_classes,
        normals_dir,
        size,
        val_fraction,
        val_seed,
    )
