"""Layout (c): the real NYUv2 mini fixture (``shared/data/nyuv2-fixture``, see its README.md
and PROVENANCE.md): 28 labeled-set frames at 240×320 in one ``nyuv2_mini_real.npz``.

It exists so that loaders and metrics are checked on real frames; it is far too small to train
on. Splits follow its official-split flags (``train``: 10 frames; ``test``/``val``: 18). Not
every frame has every target (``has_depth``, ``has_seg``, ``has_normal``); a missing one is
filled with 255 / 0 and recorded in ``has``. Ground-truth normals exist for frame 3 only;
``derived_normals=True`` uses normals derived from depth instead (``normals_source =
"derived"``).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError, DataError
from ...registry import DATASETS
from .common import NYUv2Dataset, as_depth, as_image, as_labels, as_normals, select_split
from .geometry import NYU_INTRINSICS, normals_from_depth

FILE = "nyuv2_mini_real.npz"
TEST_LABELS = "nyuv2_test_labels.npz"
#: key -> (trailing shape after N, dtype kinds accepted)
KEYS = {
    "index": ((), "iu"),
    "split": ((), "iub"),
    "rgb": (("H", "W", 3), "u"),
    "depth": (("H", "W"), "f"),
    "seg13": (("H", "W"), "u"),
    "seg40": (("H", "W"), "u"),
    "normal": (("H", "W", 3), "f"),
    "has_depth": ((), "b"),
    "has_seg": ((), "b"),
    "has_normal": ((), "b"),
}


def default_root() -> Path:
    """``../shared/data/nyuv2-fixture`` relative to the repository holding this package."""
    return Path(__file__).resolve().parents[5] / "shared" / "data" / "nyuv2-fixture"


def fixture_file(root: str | Path | None) -> Path:
    """The fixture's npz given its folder or file (default :func:`default_root`)."""
    path = Path(root).expanduser() if root is not None else default_root()
    path = path / FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: NYUv2 fixture not found (expected a folder holding {FILE})")
    return path


def load_fixture(path: Path) -> dict[str, np.ndarray]:
    """All arrays of the fixture npz, after checking keys and shapes (else a DataError)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
            data = {k: z[k] for k in KEYS}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: unreadable or truncated npz ({e})") from None
    if data["index"].ndim != 1:
        raise DataError(f"{path}: index has shape {data['index'].shape}, expected (N,)")
    n = len(data["index"])
    h, w = data["rgb"].shape[1:3] if data["rgb"].ndim == 4 else (0, 0)
    for key, (trail, kinds) in KEYS.items():
        want = (n,) + tuple({"H": h, "W": w}.get(d, d) for d in trail)
        a = data[key]
        if a.shape != want or a.dtype.kind not in kinds:
            raise DataError(f"{path}: {key} has shape {a.shape} {a.dtype}, expected {want}")
    return data


class NYUv2Fixture(NYUv2Dataset):
    """The real NYUv2 mini fixture (see the module docstring)."""

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        augment: bool = False,
        num_classes: int = 13,
        derived_normals: bool = False,
        size: Sequence[int] | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
    ) -> None:
        if num_classes not in (13, 40):
            raise ConfigError(
                f"dataset 'nyuv2-fixture': num_classes must be 13 or 40, got {num_classes}"
            )
        self.path = fixture_file(root)
        self.data = load_fixture(self.path)
        flags = self.data["split"].astype(int)
        frames = np.arange(len(flags))
        ids = select_split(
            split,
            frames[flags == 0],
            frames[flags == 1],
            val_fraction,
            val_seed,
            "dataset 'nyuv2-fixture'",
        )
        super().__init__(ids, augment, size, num_classes)
        self.derived = bool(derived_normals)
        if self.derived:
            self.normals_source = "derived"
        self.has = {
            "semseg": self.data["has_seg"][ids],
            "depth": self.data["has_depth"][ids],
            "normals": self.data["has_depth" if self.derived else "has_normal"][ids],
        }

    def read(self, i: int) -> dict[str, np.ndarray | None]:
        k, d = int(self.ids[i]), self.data
        where = f"{self.path} frame {int(d['index'][k])}"
        depth = as_depth(d["depth"][k], where) if d["has_depth"][k] else None
        if self.derived:
            normals = None
            if depth is not None:
                n = normals_from_depth(torch.from_numpy(depth), NYU_INTRINSICS)
                normals = n.permute(1, 2, 0).numpy()
        else:
            normals = as_normals(d["normal"][k], where) if d["has_normal"][k] else None
        seg = d[f"seg{self.num_classes}"][k]
        return {
            "image": as_image(d["rgb"][k], where),
            "semseg": as_labels(seg, where, self.num_classes) if d["has_seg"][k] else None,
            "depth": depth,
            "normals": normals,
        }

    def describe(self, i: int) -> str:
        return f"{self.path} frame {int(self.data['index'][int(self.ids[i])])}"


@DATASETS.register("nyuv2-fixture")
def nyuv2_fixture(
    split: str = "train",
    root: str | None = None,
    augment: bool = False,
    num_classes: int = 13,
    derived_normals: bool = False,
    size: Sequence[int] | None = None,
    val_fraction: float = 0.0,
    val_seed: int = 0,
) -> NYUv2Fixture:
    """The 28-frame real NYUv2 fixture (240×320; for checks, not training)."""
    return NYUv2Fixture(
        root, split, augment, num_classes, derived_normals, size, val_fraction, val_seed
    )
