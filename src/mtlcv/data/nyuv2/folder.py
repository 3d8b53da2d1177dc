"""Layout (a): the preprocessed NYUv2 release of mtan (Liu et al., CVPR 2019), also used by
LibMTL, CAGrad, Nash-MTL and FAMO.

``ROOT/{train,val}/{image,label,depth,normal}/{i}.npy``, 795 train and 654 val frames at
288×384: ``image`` H×W×3 float in [0, 1]; ``label`` H×W float, 13 classes, −1 = ignore;
``depth`` H×W×1 metres, 0 = missing; ``normal`` H×W×3, 0 = missing, passed through in the
release's own frame (mtan's flip negates its channel 0, as :func:`~mtlcv.data.transforms.hflip`
does). The release's ``val`` folder holds the 654 official TEST frames, on which every one of
those papers reports: here ``split="test"`` and ``split="val"`` both read it, unless
``val_fraction`` holds out part of ``train`` as a validation split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError, DataError
from ...registry import DATASETS
from .common import (
    NYUv2Dataset,
    as_depth,
    as_image,
    as_labels,
    as_normals,
    check_split,
    load_npy,
    select_split,
)

#: task name -> modality folder of the release
FOLDERS = {"image": "image", "semseg": "label", "depth": "depth", "normals": "normal"}
LAYOUT = "ROOT/{train,val}/{image,label,depth,normal}/{i}.npy"


def list_indices(folder: Path) -> dict[int, Path]:
    """``{i: folder/i.npy}`` for every file named ``<integer>.npy`` in ``folder``."""
    out = {}
    for p in folder.iterdir():
        m = re.fullmatch(r"(\d+)\.npy", p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def split_folder(root: Path, name: str) -> Path:
    """``root/name`` after checking that ``root`` looks like the release (else a DataError)."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (expected {LAYOUT})")
    folder = root / name
    if not folder.is_dir():
        hint = ""
        if (root / "image").is_dir():
            hint = f"; {root} looks like a split folder: point data.root at its parent"
        raise DataError(f"{root}: no {name}/ folder (expected {LAYOUT}){hint}")
    for sub in FOLDERS.values():
        if not (folder / sub).is_dir():
            raise DataError(f"{folder / sub}: missing modality folder {sub}/ (expected {LAYOUT})")
    return folder


class NYUv2Folder(NYUv2Dataset):
    """NYUv2 in the mtan ``.npy`` layout (see the module docstring); ``root`` = ROOT."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        augment: bool = False,
        val_fraction: float = 0.0,
        val_seed: int = 0,
        size: Sequence[int] | None = None,
    ) -> None:
        root = Path(root).expanduser()
        check_split(split, "dataset 'nyuv2'")
        use_train = split == "train" or (split == "val" and val_fraction > 0)
        folder = split_folder(root, "train" if use_train else "val")
        files = {t: list_indices(folder / sub) for t, sub in FOLDERS.items()}
        if not files["image"]:
            raise DataError(f"{folder / 'image'}: no <i>.npy files (expected {LAYOUT})")
        for task, found in files.items():
            missing = sorted(set(files["image"]) - set(found))
            if missing:
                raise DataError(
                    f"{folder / FOLDERS[task] / f'{missing[0]}.npy'}: file not found "
                    f"({len(missing)} {FOLDERS[task]} file(s) missing)"
                )
        self.files = files
        all_ids = np.array(sorted(files["image"]))
        ids = select_split(split, all_ids, all_ids, val_fraction, val_seed, "dataset 'nyuv2'")
        super().__init__(ids, augment, size, 13)

    def read(self, i: int) -> dict[str, np.ndarray | None]:
        k = int(self.ids[i])
        p = {t: self.files[t][k] for t in FOLDERS}
        return {
            "image": as_image(load_npy(p["image"]), p["image"]),
            "semseg": as_labels(load_npy(p["semseg"]), p["semseg"], 13),
            "depth": as_depth(load_npy(p["depth"]), p["depth"]),
            "normals": as_normals(load_npy(p["normals"]), p["normals"]),
        }

    def describe(self, i: int) -> str:
        return str(self.files["image"][int(self.ids[i])])


@DATASETS.register("nyuv2")
def nyuv2(
    split: str = "train",
    root: str | None = None,
    augment: bool = False,
    val_fraction: float = 0.0,
    val_seed: int = 0,
    size: Sequence[int] | None = None,
) -> NYUv2Folder:
    """NYUv2, mtan's preprocessed .npy release (288×384; test = its val folder)."""
    if root is None:
        raise ConfigError(
            "config key 'data.root': dataset 'nyuv2' needs the folder holding train/ and val/ "
            f"({LAYOUT}; see docs/datasets.md)"
        )
    return NYUv2Folder(root, split, augment, val_fraction, val_seed, size)
