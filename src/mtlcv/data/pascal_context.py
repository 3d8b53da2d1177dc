"""PASCAL-Context multi-task, as in the dense-prediction survey (Vandenhende et al., "Multi-Task
Learning for Dense Prediction Tasks: A Survey", TPAMI 2021; after Maninis et al., ASTMT, CVPR
2019): semantic segmentation, human parts, saliency, surface normals and edges on the PASCAL
images annotated by PASCAL-Context (Mottaghi et al., CVPR 2014).

Layout: the survey's ``PASCAL_MT`` folder (its code downloads it; here nothing is downloaded)::

    ROOT/JPEGImages/<id>.jpg
    ROOT/ImageSets/Context/{train,val}.txt           (4998 / 5105 image ids)
    ROOT/semseg/pascal-context/<id>.png               (or semseg/VOC12/<id>.png): 21 classes
    ROOT/human_parts/<id>.mat                         PASCAL-Part annotations (MATLAB v5)
    ROOT/sal_distill/<id>.png                         distilled saliency, 0..255
    ROOT/normals_distill/<id>.png                     distilled normals, RGB = 255 (n + 1) / 2
    ROOT/pascal-context/trainval/<id>.mat             PASCAL-Context ``LabelMap`` (MATLAB v5)

Targets, as the survey's ``data/pascal_context.py`` builds them:

* ``semseg``: the PNG's 21 classes (VOC's 20 + background), 255 = ignore;
* ``human_parts``: 7 classes (background + the 6 part groups of the survey's ``HUMAN_PART[6]``
  table) painted from every person object's part masks (class index 15); an image without a
  person with parts is all 255 (ignore), so human-part mIoU is over images with people, as the
  survey's ``AddIgnoreRegions`` makes it. Scored as task kind ``semseg`` (mIoU over the parts);
* ``saliency``: ``sal_distill / 255 > 0.5``;
* ``normals``: ``2 rgb / 255 - 1``, kept only on pixels whose PASCAL-Context class is one of
  the 170 classes shared with NYUv2 (the survey's ``normals_valid_classes``), 0 elsewhere;
* ``edges``: the pixels where the 4-neighbour Laplacian of ``LabelMap`` is non-zero.
  Deviation: the survey then thins them with scikit-image's ``thin``; we do not (no
  scikit-image), so our edges are up to two pixels wide, and the survey's evaluation (the
  MATLAB ``seism`` ODS F-measure with a distance tolerance) is not ours either: edge numbers
  here compare models within mtlcv only.

The ``.mat`` files are MATLAB v5, read with SciPy (``pip install scipy``; only this dataset
needs it). Splits: ``val`` and ``test`` are the survey's ``val`` list (where it reports), unless
``val_fraction`` holds out part of ``train``. ``augment`` flips horizontally. The survey trains at
512×512; ``size`` resizes every sample (default: none).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from .dense import DenseDataset, check_labels, check_size, read_image, read_png
from .nyuv2.common import select_split

TARGETS = ("semseg", "human_parts", "saliency", "normals", "edges")
PERSON = 15
#: the survey's 6-group human-part table (``HUMAN_PART[6]``)
PARTS6 = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "lfoot": 6, "lhand": 4,
    "llarm": 4, "llleg": 6, "luarm": 3, "luleg": 5, "mouth": 1, "neck": 2, "nose": 1, "rear": 1,
    "rebrow": 1, "reye": 1, "rfoot": 6, "rhand": 4, "rlarm": 4, "rlleg": 6, "ruarm": 3,
    "ruleg": 5, "torso": 2,
}
#: PASCAL-Context class ids that are also NYUv2 classes: where the distilled normals are kept
#: (derived from the survey's ``db_info/nyu_classes.json`` and ``context_classes.json``)
NORMALS_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159,
    165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223,
    225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417,
    419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))


def loadmat(path: Path) -> dict[str, Any]:
    """``scipy.io.loadmat`` with one-line errors for a missing SciPy or a bad file."""
    try:
        from scipy.io import loadmat as _loadmat
    except ImportError:
        raise ConfigError(f"{path}: reading PASCAL-Context's MATLAB files needs SciPy "
                          "(pip install scipy)") from None
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return _loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - SciPy raises several kinds for a corrupt file
        raise DataError(f"{path}: unreadable MATLAB file ({str(e).splitlines()[0]})") from None


def edges_from_labels(labels: np.ndarray) -> np.ndarray:
    """1 where the 4-neighbour Laplacian of the label map is non-zero (borders replicated)."""
    p = np.pad(labels.astype(np.float64), 1, mode="edge")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]
    return (lap != 0).astype(np.float32)


def human_parts(anno: Any, shape: tuple[int, int], where: str) -> np.ndarray | None:
    """The 7-class part map of a PASCAL-Part ``anno`` record, or None without a person's parts."""
    try:
        objects = anno[0][0][1][0]
        target = None
        for obj in objects:
            if int(np.asarray(obj[1]).ravel()[0]) != PERSON or len(obj[3]) == 0:
                continue
            if target is None:
                target = np.zeros(shape, dtype=np.int64)
            for part in obj[3][0]:
                name = str(np.asarray(part[0]).ravel()[0])
                if name not in PARTS6:
                    raise DataError(f"{where}: unknown human part {name!r}")
                mask = np.asarray(part[1]).astype(bool)
                if mask.shape != shape:
                    raise DataError(f"{where}: part mask {mask.shape}, image {shape}")
                target[mask] = PARTS6[name]
    except (IndexError, TypeError, ValueError) as e:
        raise DataError(f"{where}: not a PASCAL-Part annotation ({e})") from None
    return target


class PascalContext(DenseDataset):
    """The survey's PASCAL-Context multi-task set (see the module docstring); ``root`` = ROOT."""

    layouts = {"semseg": "labels", "human_parts": "labels", "saliency": "binary",
               "normals": "vectors", "edges": "binary"}
    targets = TARGETS
    task_kinds = {"human_parts": "semseg"}
    task_options = {"semseg": {"num_classes": 21}, "human_parts": {"num_classes": 7}}

    def __init__(self, root: str | Path, split: str = "train", augment: bool = False,
                 val_fraction: float = 0.0, val_seed: int = 0,
                 size: Sequence[int] | None = None) -> None:
        where = "dataset 'pascal-context'"
        super().__init__(augment, check_size(size, where))
        self.root = root = Path(root).expanduser()
        use_train = split == "train" or (split == "val" and val_fraction > 0)
        lst = root / "ImageSets" / "Context" / ("train.txt" if use_train else "val.txt")
        if not lst.is_file():
            raise DataError(f"{lst}: split list not found (expected the survey's PASCAL_MT "
                            "layout, see docs/datasets.md)")
        names = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
        if not names:
            raise DataError(f"{lst}: no image ids")
        self.names = names
        idx = np.arange(len(names))
        self.ids = select_split(split, idx, idx, val_fraction, val_seed, where)

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, i: int) -> str:
        return self.names[int(self.ids[i])]

    def describe(self, i: int) -> str:
        return str(self.root / "JPEGImages" / f"{self.name(i)}.jpg")

    def semseg_path(self, n: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{n}.png"
        return voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{n}.png"

    def read(self, i: int) -> dict[str, np.ndarray | None]:
        n = self.name(i)
        r = self.root
        img = read_image(r / "JPEGImages" / f"{n}.jpg")
        shape = img.shape[:2]
        sem = check_labels(read_png(self.semseg_path(n)), self.semseg_path(n), 21)
        ctx = r / "pascal-context" / "trainval" / f"{n}.mat"
        m = loadmat(ctx)
        if "LabelMap" not in m:
            raise DataError(f"{ctx}: no 'LabelMap' variable")
        labels = np.asarray(m["LabelMap"])
        if labels.shape != shape:
            raise DataError(f"{ctx}: LabelMap {labels.shape}, image {shape}")
        hp = r / "human_parts" / f"{n}.mat"
        hm = loadmat(hp)
        if "anno" not in hm:
            raise DataError(f"{hp}: no 'anno' variable")
        parts = human_parts(hm["anno"], shape, str(hp))
        sal_path = r / "sal_distill" / f"{n}.png"
        sal = (read_png(sal_path) / 255.0 > 0.5).astype(np.float32)
        npath = r / "normals_distill" / f"{n}.png"
        normals = self._normals(npath, labels)
        return {"image": img, "semseg": sem,
                "human_parts": None if parts is None else parts,
                "saliency": sal, "normals": normals, "edges": edges_from_labels(labels)}

    @staticmethod
    def _normals(path: Path, labels: np.ndarray) -> np.ndarray:
        from PIL import Image

        if not path.is_file():
            raise DataError(f"{path}: file not found")
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
        if rgb.shape[:2] != labels.shape:
            raise DataError(f"{path}: normals {rgb.shape[:2]}, image {labels.shape}")
        n = 2.0 * rgb / 255.0 - 1.0
        keep = np.isin(labels, list(NORMALS_CLASSES))
        n = np.where(keep[..., None], n, 0.0)
        norm = np.linalg.norm(n, axis=-1, keepdims=True)
        return np.where(norm > 1e-3, n / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


@DATASETS.register("pascal-context")
def pascal_context(split: str = "train", root: str | None = None, augment: bool = False,
                   val_fraction: float = 0.0, val_seed: int = 0,
                   size: Sequence[int] | None = None) -> PascalContext:
    """PASCAL-Context multi-task as in the survey: semseg, human parts, saliency, normals, edges."""
    if root is None:
        raise ConfigError("config key 'data.root': dataset 'pascal-context' needs the survey's "
                          "PASCAL_MT folder (see docs/datasets.md)")
    return PascalContext(root, split, augment, val_fraction, val_seed, size)
