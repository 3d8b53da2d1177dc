"""Cityscapes (Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding",
CVPR 2016): semantic segmentation (7 categories or 19 classes) and depth, in two layouts.

=======================  ======================================================================
``cityscapes``           the preprocessed ``.npy`` release of mtan (Liu et al., CVPR 2019), used
                         by CAGrad, Nash-MTL, FAMO and LibMTL: ``ROOT/{train,val}/{image,
                         label_7,label_19,depth}/{i}.npy`` at 128×256 (LibMTL's copy names the
                         7-class folder ``label``); image H×W×3 in [0, 1], labels H×W with −1 =
                         ignore, depth H×W×1 (the release's inverse-depth values), 0 = missing.
``cityscapes-official``  the official folders ``leftImg8bit/``, ``gtFine/`` (``*_labelIds.png``)
                         and ``disparity/`` (16-bit PNG, ``d = (p − 1) / 256`` pixels, 0 =
                         invalid), plus ``camera/`` (``*_camera.json``) for metric depth.
=======================  ======================================================================

Both give ``semseg`` and ``depth``. The releases' ``val`` folder (the 500 official validation
images; the test labels are not public) is where every one of those papers reports, so
``split: test`` and ``split: val`` both read it, unless ``val_fraction`` holds out part of
``train`` (as for NYUv2). Classes: ``num_classes: 19`` = the 19 evaluation classes (the official
``trainId`` mapping of ``cityscapesscripts``); ``7`` = the 7 categories flat, construction,
object, nature, sky, human, vehicle (the label's official ``categoryId`` minus 1; the void
category is ignored), which is what the 7-class release holds. ``augment`` flips horizontally
(the release's papers train without scale augmentation, and a zoom would have to rescale
disparity the other way round than depth).

Depth from the official folders: ``depth: disparity`` (default) gives the disparity in pixels;
``depth: metres`` gives ``baseline * fx / disparity`` from each image's camera file. The
preprocessed release's depth values are its own encoding (inverse depth, normalised), so numbers
on the two layouts are not comparable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from .dense import DenseDataset, check_labels, check_size, read_image, read_png
from .nyuv2.common import as_depth, as_image, as_labels, load_npy, select_split

LAYOUT = "ROOT/{train,val}/{image,label_7 or label_19 (or label),depth}/{i}.npy"
OFFICIAL = "ROOT/{leftImg8bit,gtFine,disparity}/{train,val}/<city>/*.png"

# labelId -> (trainId, categoryId), the official table (cityscapesscripts/helpers/labels.py)
_LABELS = {
    0: (255, 0), 1: (255, 0), 2: (255, 0), 3: (255, 0), 4: (255, 0), 5: (255, 0), 6: (255, 0),
    7: (0, 1), 8: (1, 1), 9: (255, 1), 10: (255, 1), 11: (2, 2), 12: (3, 2), 13: (4, 2),
    14: (255, 2), 15: (255, 2), 16: (255, 2), 17: (5, 3), 18: (255, 3), 19: (6, 3), 20: (7, 3),
    21: (8, 4), 22: (9, 4), 23: (10, 5), 24: (11, 6), 25: (12, 6), 26: (13, 7), 27: (14, 7),
    28: (15, 7), 29: (255, 7), 30: (255, 7), 31: (16, 7), 32: (17, 7), 33: (18, 7),
}


def label_lut(num_classes: int) -> np.ndarray:
    """Lookup table labelId (0..255) -> class id (255 = ignore) for 19 classes or 7 categories."""
    lut = np.full(256, 255, dtype=np.int64)
    for lid, (train, cat) in _LABELS.items():
        lut[lid] = train if num_classes == 19 else (cat - 1 if cat > 0 else 255)
    return lut


def _check_classes(num_classes: int, where: str) -> int:
    if num_classes not in (7, 19):
        raise ConfigError(f"{where}: num_classes must be 7 or 19, got {num_classes!r}")
    return num_classes


class CityscapesFolder(DenseDataset):
    """The preprocessed ``.npy`` release (see the module docstring); ``root`` = ROOT."""

    targets = ("semseg", "depth")
    layouts = {"semseg": "labels", "depth": "map"}

    def __init__(self, root: str | Path, split: str = "train", augment: bool = False,
                 num_classes: int = 7, val_fraction: float = 0.0, val_seed: int = 0,
                 size: Sequence[int] | None = None) -> None:
        super().__init__(augment, check_size(size, "dataset 'cityscapes'"))
        self.num_classes = _check_classes(num_classes, "dataset 'cityscapes'")
        self.task_options = {"semseg": {"num_classes": self.num_classes}}
        root = Path(root).expanduser()
        use_train = split == "train" or (split == "val" and val_fraction > 0)
        folder = root / ("train" if use_train else "val")
        if not folder.is_dir():
            raise DataError(f"{root}: no {folder.name}/ folder (expected {LAYOUT})")
        names = [f"label_{num_classes}"] + (["label"] if num_classes == 7 else [])
        label = next((folder / n for n in names if (folder / n).is_dir()), None)
        if label is None:
            raise DataError(f"{folder}: no {' or '.join(n + '/' for n in names)} folder "
                            f"(expected {LAYOUT})")
        self.dirs = {"image": folder / "image", "semseg": label, "depth": folder / "depth"}
        for d in self.dirs.values():
            if not d.is_dir():
                raise DataError(f"{d}: missing modality folder (expected {LAYOUT})")
        ids = sorted(int(m.group(1)) for p in self.dirs["image"].iterdir()
                     if (m := re.fullmatch(r"(\d+)\.npy", p.name)))
        if not ids:
            raise DataError(f"{self.dirs['image']}: no <i>.npy files (expected {LAYOUT})")
        all_ids = np.array(ids)
        self.ids = select_split(split, all_ids, all_ids, val_fraction, val_seed,
                                "dataset 'cityscapes'")

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, i: int) -> str:
        return str(self.dirs["image"] / f"{int(self.ids[i])}.npy")

    def read(self, i: int) -> dict[str, np.ndarray | None]:
        k = int(self.ids[i])
        p = {key: d / f"{k}.npy" for key, d in self.dirs.items()}
        img = load_npy(p["image"])
        if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
            img = np.moveaxis(img, 0, -1)  # a channels-first copy
        return {
            "image": as_image(img, p["image"]),
            "semseg": as_labels(load_npy(p["semseg"]), p["semseg"], self.num_classes),
            "depth": as_depth(load_npy(p["depth"]), p["depth"]),
        }


class CityscapesOfficial(DenseDataset):
    """The official ``leftImg8bit/gtFine/disparity`` folders (see the module docstring)."""

    targets = ("semseg", "depth")
    layouts = {"semseg": "labels", "depth": "map"}

    def __init__(self, root: str | Path, split: str = "train", augment: bool = False,
                 num_classes: int = 7, depth: str = "disparity", val_fraction: float = 0.0,
                 val_seed: int = 0, size: Sequence[int] | None = (128, 256)) -> None:
        where = "dataset 'cityscapes-official'"
        super().__init__(augment, check_size(size, where))
        self.num_classes = _check_classes(num_classes, where)
        if depth not in ("disparity", "metres"):
            raise ConfigError(f"{where}: depth must be 'disparity' or 'metres', got {depth!r}")
        self.depth = depth
        self.task_options = {"semseg": {"num_classes": self.num_classes}}
        self.lut = label_lut(self.num_classes)
        self.root = root = Path(root).expanduser()
        use_train = split == "train" or (split == "val" and val_fraction > 0)
        name = "train" if use_train else "val"
        images = root / "leftImg8bit" / name
        if not images.is_dir():
            raise DataError(f"{images}: folder not found (expected {OFFICIAL})")
        self.items = sorted(str(p.relative_to(images))[: -len("_leftImg8bit.png")]
                            for p in images.glob("*/*_leftImg8bit.png"))
        if not self.items:
            raise DataError(f"{images}: no <city>/*_leftImg8bit.png files (expected {OFFICIAL})")
        self.split_name = name
        idx = np.arange(len(self.items))
        self.ids = select_split(split, idx, idx, val_fraction, val_seed, where)

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, kind: str, i: int) -> Path:
        stem = self.items[int(self.ids[i])]
        sub = {"image": ("leftImg8bit", "_leftImg8bit.png"),
               "semseg": ("gtFine", "_gtFine_labelIds.png"),
               "depth": ("disparity", "_disparity.png"),
               "camera": ("camera", "_camera.json")}[kind]
        return self.root / sub[0] / self.split_name / f"{stem}{sub[1]}"

    def describe(self, i: int) -> str:
        return str(self.path("image", i))

    def read(self, i: int) -> dict[str, np.ndarray | None]:
        img = read_image(self.path("image", i))
        ids = read_png(self.path("semseg", i))
        if ids.min() < 0 or ids.max() > 255:
            raise DataError(f"{self.path('semseg', i)}: label ids outside 0..255")
        sem = check_labels(self.lut[ids], self.path("semseg", i), self.num_classes)
        raw = read_png(self.path("depth", i)).astype(np.float32)
        disp = np.where(raw > 0, (raw - 1.0) / 256.0, 0.0).astype(np.float32)
        if self.depth == "metres":
            cam = self.path("camera", i)
            try:
                c = json.loads(cam.read_text())
                f = float(c["intrinsic"]["fx"]) * float(c["extrinsic"]["baseline"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{cam}: cannot read fx and baseline ({e})") from None
            disp = np.where(disp > 0, f / np.maximum(disp, 1e-6), 0.0).astype(np.float32)
        return {"image": img, "semseg": sem, "depth": disp}


@DATASETS.register("cityscapes")
def cityscapes(split: str = "train", root: str | None = None, augment: bool = False,
               num_classes: int = 7, val_fraction: float = 0.0, val_seed: int = 0,
               size: Sequence[int] | None = None) -> CityscapesFolder:
    """Cityscapes, mtan's preprocessed .npy release (128×256; 7 or 19 classes + depth)."""
    if root is None:
        raise ConfigError(f"config key 'data.root': dataset 'cityscapes' needs the folder "
                          f"holding train/ and val/ ({LAYOUT}; see docs/datasets.md)")
    return CityscapesFolder(root, split, augment, num_classes, val_fraction, val_seed, size)


@DATASETS.register("cityscapes-official")
def cityscapes_official(split: str = "train", root: str | None = None, augment: bool = False,
                        num_classes: int = 7, depth: str = "disparity",
                        val_fraction: float = 0.0, val_seed: int = 0,
                        size: Sequence[int] | None = (128, 256)) -> CityscapesOfficial:
    """Cityscapes from the official leftImg8bit/gtFine/disparity folders (resized to 128×256)."""
    if root is None:
        raise ConfigError(f"config key 'data.root': dataset 'cityscapes-official' needs the "
                          f"folder holding leftImg8bit/, gtFine/ and disparity/ ({OFFICIAL})")
    return CityscapesOfficial(root, split, augment, num_classes, depth, val_fraction, val_seed,
                              size)
