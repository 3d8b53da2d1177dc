"""``mtlcv data check PATH``: validate a dataset folder or file before training on it.

The layout is detected from ``PATH`` (or given as ``kind``, a dataset name):

* ``nyuv2`` — a folder with ``train/`` and ``val/``, each with ``image/ label/ depth/ normal/``
  holding ``{i}.npy`` (mtan's release);
* ``nyuv2-mat`` — ``nyu_depth_v2_labeled.mat`` (or a folder holding it), plus ``splits.mat``
  next to it when present;
* ``nyuv2-fixture`` — the fixture folder or its ``nyuv2_mini_real.npz``;
* ``cityscapes`` (the preprocessed ``.npy`` release), ``cityscapes-official`` (the
  ``leftImg8bit/gtFine/disparity`` folders), ``pascal-context`` (the survey's ``PASCAL_MT``),
  ``office-31`` and ``office-home`` (image folders): every sample of every split is read through
  the dataset's own loader, whose checks name the file (:func:`_samples`);
* ``scenes`` — a scenes cache folder (``meta.json`` + ``{train,val,test}.npz``, written by
  ``mtlcv data scenes`` or on first use): every split loads with the shapes meta.json gives,
  labels, depth, normals, edges and room types hold valid values, and every detection box has
  a positive width and height, finite coordinates inside the image and a class in [0, 10).

Every file is read: layout, counts (the same indices in every modality), shapes, dtypes and
value ranges (depth finite and ≥ 0, normals of length 1 or 0, labels in [0, 13) or ignore).
Each problem is one line naming the file; nothing stops at the first one.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import ConfigError, DataError
from .nyuv2.common import as_depth, as_image, as_labels, as_normals, load_npy
from .nyuv2.fixture import FILE, TEST_LABELS, load_fixture
from .nyuv2.folder import FOLDERS, LAYOUT, list_indices
from .nyuv2.mat import NUM_RAW_CLASSES, check_labeled_file, load_splits
from .office import DOMAINS

KINDS = ("nyuv2", "nyuv2-mat", "nyuv2-fixture", "scenes", "cityscapes",
         "cityscapes-official", "pascal-context", "office-31", "office-home")
#: share of valid normal pixels allowed a length that is neither 0 nor 1 (± 0.1): resized
#: releases blend a few pixels at the border of missing regions
NORMAL_TOLERANCE = 0.01
CHUNK = 16  # frames read at once from the .mat file
SCENES_SPLITS = ("train", "val", "test")
CHECKS = {"image": as_image, "semseg": as_labels, "depth": as_depth, "normals": as_normals}


def detect(path: Path) -> str | None:
    """The layout ``path`` looks like, or None."""
    if path.is_file():
        return {".mat": "nyuv2-mat", ".npz": "nyuv2-fixture"}.get(path.suffix)
    if (path / "meta.json").is_file() and (path / "train.npz").is_file():
        return "scenes"
    if (path / "leftImg8bit").is_dir() or (path / "gtFine").is_dir():
        return "cityscapes-official"
    if (path / "JPEGImages").is_dir() and (path / "ImageSets").is_dir():
        return "pascal-context"
    for kind in ("office-31", "office-home"):
        if all((path / d).is_dir() for d in DOMAINS[kind]):
            return kind
    for split in ("train", "val"):
        s = path / split
        if (s / "depth").is_dir() and not (s / "normal").is_dir() and any(
                (s / n).is_dir() for n in ("label_7", "label_19", "label")):
            return "cityscapes"
    if (path / "train").is_dir() or (path / "val").is_dir():
        return "nyuv2"
    if (path / FILE).is_file():
        return "nyuv2-fixture"
    if (path / "nyu_depth_v2_labeled.mat").is_file():
        return "nyuv2-mat"
    if (path / "meta.json").is_file() or any((path / f"{s}.npz").is_file() for s in SCENES_SPLITS):
        return "scenes"  # an incomplete cache: the check says what is missing
    return None


def normal_lengths(a: np.ndarray, where: object) -> str | None:
    """A problem line when too many normals are neither unit nor zero, else None."""
    if a.ndim != 3 or a.shape[-1] != 3 or not np.isfinite(a).all():
        return None  # as_normals reports these
    n = np.linalg.norm(a.astype(np.float64), axis=-1)
    if n.max(initial=0.0) > 1.5:
        return None  # not normals at all: as_normals reports it
    valid = n > 1e-3
    off = valid & (np.abs(n - 1) > 0.1)
    if off.sum() > NORMAL_TOLERANCE * max(1, valid.sum()):
        return (
            f"{where}: {100 * off.sum() / valid.sum():.1f}% of normals have a length neither 0 "
            f"nor 1 (range {n[valid].min():.3g}..{n[valid].max():.3g})"
        )
    return None


def _folder(root: Path) -> tuple[list[str], str]:
    problems, counts = [], []
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            problems.append(f"{folder}: missing split folder (expected {LAYOUT})")
            continue
        files = {}
        for task, sub in FOLDERS.items():
            if (folder / sub).is_dir():
                files[task] = list_indices(folder / sub)
            else:
                problems.append(f"{folder / sub}: missing modality folder")
        ids = sorted(set().union(*files.values())) if files else []
        counts.append(f"{split} {len(ids)}")
        if ids and ids != list(range(len(ids))):
            gaps = sorted(set(range(ids[-1] + 1)) - set(ids))
            problems.append(f"{folder}: indices are not 0..{len(ids) - 1} (missing {gaps[:5]})")
        for i in ids:
            shapes = {}
            for task, found in files.items():
                p = folder / FOLDERS[task] / f"{i}.npy"
                if i not in found:
                    problems.append(f"{p}: file not found")
                    continue
                try:
                    a = load_npy(p)
                    if task == "normals":
                        line = normal_lengths(a, p)
                        if line:
                            problems.append(line)
                    shapes[task] = CHECKS[task](a, p).shape[:2]
                except DataError as e:
                    problems.append(str(e))
            if len(set(shapes.values())) > 1:
                problems.append(f"{folder}/*/{i}.npy: sizes differ across modalities {shapes}")
    return problems, f"nyuv2 layout, frames: {', '.join(counts)}"


def _mat(path: Path) -> tuple[list[str], str]:
    if path.is_dir():
        path = path / "nyu_depth_v2_labeled.mat"
    try:
        n, h, w = check_labeled_file(path)
    except DataError as e:
        return [str(e)], "nyuv2-mat layout"
    problems = []
    with h5py.File(path, "r") as f:
        for key, kinds in (("images", "u"), ("depths", "f"), ("labels", "ui")):
            if f[key].dtype.kind not in kinds:
                problems.append(f"{path}: {key} has dtype {f[key].dtype}")
        for start in range(0, n, CHUNK):
            depths = np.asarray(f["depths"][start : start + CHUNK])
            labels = np.asarray(f["labels"][start : start + CHUNK])
            for j in range(len(depths)):
                where = f"{path} frame {start + j + 1}"
                try:
                    as_depth(depths[j], where)
                except DataError as e:
                    problems.append(str(e))
                if labels[j].size and (labels[j].min() < 0 or labels[j].max() > NUM_RAW_CLASSES):
                    problems.append(f"{where}: label id outside 0..{NUM_RAW_CLASSES}")
    splits = path.parent / "splits.mat"
    note = "no splits.mat next to it (give data.options.splits)"
    if splits.is_file():
        try:
            train, test = load_splits(splits, n)
            note = f"splits.mat: train {len(train)}, test {len(test)}"
        except DataError as e:
            problems.append(str(e))
    return problems, f"nyuv2-mat layout, {n} frames at {h}×{w}; {note}"


def _scenes(root: Path) -> tuple[list[str], str]:
    """A scenes cache: meta.json, every split's arrays (shapes), their values and the boxes."""
    from ..tasks.detection import check_boxes
    from .scenes import DET_CLASSES, ROOM_TYPES, _load_split, _read_meta

    if root.is_file():
        root = root.parent
    try:
        meta = _read_meta(root)
    except DataError as e:
        return [str(e)], "scenes cache"
    h, w = meta["size"]
    problems, counts, total = [], [], 0
    classes = len(meta.get("classes", ())) or 13
    for split in SCENES_SPLITS:
        try:
            a = _load_split(root, split, meta)
        except (DataError, KeyError) as e:
            problems.append(str(e) if isinstance(e, DataError) else f"{root}: meta.json has no "
                            f"split {split!r}")
            continue
        counts.append(f"{split} {len(a['classification'])}")
        where = root / f"{split}.npz"
        seg = a["semseg"]
        bad = seg[(seg != 255) & (seg >= classes)]
        if bad.size:
            problems.append(f"{where}: semseg label {int(bad[0])} is outside [0, {classes})")
        depth = a["depth"]
        if not np.isfinite(depth).all() or (depth <= 0).any():
            problems.append(f"{where}: depth has non-finite or non-positive values")
        for k in range(len(a["normals"])):
            line = normal_lengths(a["normals"][k].transpose(1, 2, 0), f"{where} image {k}")
            if line:
                problems.append(line)
                break
        if not np.isin(a["edges"], (0, 1)).all():
            problems.append(f"{where}: edges hold values other than 0 and 1")
        rooms = a["classification"]
        if rooms.size and (rooms.min() < 0 or rooms.max() >= len(ROOM_TYPES)):
            problems.append(f"{where}: room type outside [0, {len(ROOM_TYPES)})")
        ends = np.cumsum(a["box_count"])
        for i, (start, stop) in enumerate(zip(ends - a["box_count"], ends)):
            boxes, labels = a["boxes"][start:stop], a["box_class"][start:stop]
            at = f"{where} image {i}"
            problems += check_boxes(boxes, labels, len(DET_CLASSES), at)
            outside = (boxes[:, :2] < 0).any(1) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
            problems += [f"{at}: box {j} {boxes[j].tolist()} leaves the {h}x{w} image"
                         for j in np.flatnonzero(outside)]
        total += len(a["boxes"])
    summary = (f"scenes cache, {meta['n']} images at {h}×{w}, seed {meta['seed']}; "
               f"{', '.join(counts) or 'no split readable'}; {total} boxes")
    return problems, summary


def _labels_range(a: np.ndarray, k: int, where: str) -> str | None:
    bad = a[(a != 255) & (a >= k)]
    return f"{where}: label id {int(bad[0])} is outside [0, {k}) and not 255" if bad.size else None


def _fixture(path: Path) -> tuple[list[str], str]:
    folder = path if path.is_dir() else path.parent
    path = path / FILE if path.is_dir() else path
    try:
        d = load_fixture(path) if path.is_file() else None
    except DataError as e:
        return [str(e)], "nyuv2-fixture layout"
    if d is None:
        return [f"{path}: file not found"], "nyuv2-fixture layout"
    problems = []
    for k in range(len(d["index"])):
        where = f"{path} frame {int(d['index'][k])}"
        lines = [_labels_range(d["seg13"][k], 13, where), _labels_range(d["seg40"][k], 40, where)]
        if d["has_depth"][k] != bool((d["depth"][k] > 0).any()):
            lines.append(f"{where}: has_depth disagrees with the depth map")
        if not d["has_seg"][k] and (d["seg13"][k] != 255).any():
            lines.append(f"{where}: has_seg is false but seg13 has labels")
        if d["has_normal"][k] != bool(d["normal"][k].any()):
            lines.append(f"{where}: has_normal disagrees with the normal map")
        lines.append(normal_lengths(d["normal"][k], where))
        for check, key in ((as_depth, "depth"), (as_normals, "normal")):
            try:
                check(d[key][k].astype(np.float32), where)
            except DataError as e:
                lines.append(str(e))
        problems += [line for line in lines if line]
    summary = f"nyuv2-fixture, {len(d['index'])} frames"
    labels = folder / TEST_LABELS
    if labels.is_file():
        try:
            with np.load(labels, allow_pickle=False) as z:
                seg13, index = z["seg13"], z["index"]
            if seg13.ndim != 3 or len(index) != len(seg13):
                problems.append(f"{labels}: seg13 {seg13.shape} and index {index.shape} disagree")
            line = _labels_range(seg13, 13, str(labels))
            if line:
                problems.append(line)
            summary += f"; {TEST_LABELS}: {len(seg13)} test label maps"
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            problems.append(f"{labels}: unreadable ({e})")
    return problems, summary


def _samples(kind: str, path: Path) -> tuple[list[str], str]:
    """Read every sample of the train and val splits through the dataset's loader; one line per
    failing sample (the loader's DataError names the file and the problem)."""
    from ..registry import DATASETS

    problems, counts = [], []
    opts: dict = {"balance": False} if kind.startswith("office") else {}
    if kind == "cityscapes":
        labels = {p.name for s in ("train", "val") for p in (path / s).glob("label*")}
        opts["num_classes"] = 7 if {"label_7", "label"} & labels else 19
    for split in ("train", "val"):
        try:
            ds = DATASETS.create(kind, split=split, root=str(path), **opts)
        except (DataError, ConfigError) as e:
            problems.append(str(e))
            continue
        bad = 0
        for i in range(len(ds)):
            try:
                sample = ds[i]
            except (DataError, ConfigError) as e:
                problems.append(str(e))
                bad += 1
                continue
            if not bool(torch.isfinite(sample["image"]).all()):
                problems.append(f"{kind} {split} item {i}: image has NaN or infinite values")
        counts.append(f"{split} {len(ds)}" + (f" ({bad} bad)" if bad else ""))
    return problems, f"{kind} layout, samples: {', '.join(counts) or 'none'}"


def _check(path: str | Path, kind: str | None) -> tuple[list[str], str]:
    path = Path(path).expanduser()
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"data check: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if not path.exists():
        return [f"{path}: not found"], "nothing checked"
    kind = kind or detect(path)
    if kind is None:
        return [
            f"{path}: cannot tell the layout; expected a folder with train/ and val/ ({LAYOUT}), "
            f"nyu_depth_v2_labeled.mat, the fixture's {FILE}, a scenes cache, Cityscapes, "
            "PASCAL-Context or Office folders (or give --kind)"
        ], "nothing checked"
    checks = {"nyuv2": _folder, "nyuv2-mat": _mat, "nyuv2-fixture": _fixture, "scenes": _scenes}
    if kind in checks:
        return checks[kind](path)
    return _samples(kind, path)


def check_dataset(path: str | Path, kind: str | None = None) -> list[str]:
    """Every problem found in the dataset at ``path`` (one line each; empty when it is fine).

    ``kind`` is a dataset name (one of :data:`KINDS`); by default the layout is detected from
    ``path``.
    """
    return _check(path, kind)[0]


def main_check(path: str | Path, kind: str | None = None) -> int:
    """Print one line per problem and a summary line; return 0 when clean, else 2."""
    problems, summary = _check(path, kind)
    for line in problems:
        print(line)
    if problems:
        print(f"{path}: {len(problems)} problem(s) found ({summary})")
        return 2
    print(f"{path}: OK ({summary})")
    return 0
