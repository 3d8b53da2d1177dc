"""The embedded default dataset: procedural indoor scenes with exact, self-consistent ground truth.

Every image is a random room (bedroom, living room, office or dining room) ray-cast from a random
camera at human height (see :mod:`mtlcv.data.scenes_render` for the scene model and the
renderer). Its targets come from the same geometry as its pixels, so they are exact:

* ``semseg``: NYUv2-13 class ids (0 bed, 1 books, 2 ceiling, 3 chair, 4 floor, 5 furniture,
  6 objects, 7 picture, 8 sofa, 9 table, 10 tv, 11 wall, 12 window), the 13-class mapping of
  Couprie et al., "Indoor semantic segmentation using depth information", ICLR 2013;
* ``depth``: metric depth along the optical axis (z), in metres;
* ``normals``: unit normals in the camera frame (x right, y down, z forward), facing the camera;
* ``edges``: 1 where a pixel's instance (the primitive hit) differs from a 4-neighbour's;
* ``classification``: the room type (0 bedroom, 1 living room, 2 office, 3 dining room), which
  decides the furniture a room holds;
* ``detection``: one box per visible object (:class:`~mtlcv.tasks.detection.Boxes`): the tight
  box ``(x1, y1, x2, y2)`` in pixels of its visible pixels (a modal box, as COCO's), and its
  class among the 10 NYUv2-13 classes that are objects (:data:`DET_CLASSES`: 0 bed, 1 books,
  2 chair, 3 furniture, 4 objects, 5 picture, 6 sofa, 7 table, 8 tv, 9 window; wall, floor and
  ceiling are stuff). An object is one piece of furniture with all its parts (a bed's frame,
  cover and pillow; a table's top and legs), one thing standing on it, one row of books, one
  picture, window or lamp. Objects with fewer than :data:`MIN_PIXELS` visible pixels are left
  out (too little of them is seen to tell what they are).

Images are deterministic functions of ``(seed, index)``. A cache of ``n`` images is rendered once
(:func:`write_cache`, or ``mtlcv data scenes``) and split into train/val/test; the dataset reads a
split into memory.

Example:
    >>> arrays = render(2, size=(24, 32), seed=0)
    >>> arrays["image"].shape, arrays["depth"].shape
    ((2, 3, 24, 32), (2, 1, 24, 32))
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from ..tasks.detection import Boxes
from .base import MTLDataset
from .scenes_render import CLASSES, HFOV_DEG, ROOM_TYPES, focal, render_batch, sample_scene
from .transforms import hflip

__all__ = ["CLASSES", "DET_CLASSES", "ROOM_TYPES", "ScenesDataset", "default_root", "render",
           "scenes", "write_cache"]

#: cache format; 2 added the detection boxes (a format-1 cache is re-rendered or refused)
FORMAT = 2
#: the NYUv2-13 classes that are objects, in the order of their detection class ids
DET_CLASSES = ("bed", "books", "chair", "furniture", "objects", "picture", "sofa", "table", "tv",
               "window")
#: NYUv2-13 id -> detection class id (-1: stuff)
DET_OF_CLASS = np.array([DET_CLASSES.index(c) if c in DET_CLASSES else -1 for c in CLASSES])
#: visible pixels an object needs to get a box
MIN_PIXELS = 8
BOX_KEYS = ("boxes", "box_class", "box_object", "box_count")
SPLITS = ("train", "val", "test")
_BATCH = 32  # images ray-cast together at most; the output does not depend on it
_WORKERS = max(1, min(4, os.cpu_count() or 1))


def _check(n: int, size: Sequence[int], seed: int) -> tuple[int, int]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"scenes option 'n': expected a positive number of images, got {n!r}")
    if (isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and 4 <= s <= 4096 for s in size)):
        raise ConfigError(f"scenes option 'size': expected [H, W] with 4 <= H, W <= 4096, "
                          f"got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"scenes option 'seed': expected an integer >= 0, got {seed!r}")
    return int(size[0]), int(size[1])


def _edges(inst: torch.Tensor) -> torch.Tensor:
    """1 where the instance differs from any 4-neighbour (both sides of a boundary)."""
    e = torch.zeros_like(inst, dtype=torch.bool)
    dx = inst[..., :, 1:] != inst[..., :, :-1]
    dy = inst[..., 1:, :] != inst[..., :-1, :]
    e[..., :, 1:] |= dx
    e[..., :, :-1] |= dx
    e[..., 1:, :] |= dy
    e[..., :-1, :] |= dy
    return e


def object_boxes(objects: torch.Tensor, semseg: torch.Tensor,
                 min_pixels: int = MIN_PIXELS) -> dict[str, np.ndarray]:
    """Tight boxes of the objects in object-id maps ``objects`` [N,H,W] (0 = no object).

    Returns flat arrays over all images, image by image and by object id: ``boxes`` float32
    [M,4] ``(x1, y1, x2, y2)`` in pixel edges (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``),
    ``box_class`` uint8 [M] (detection class id of the object's NYUv2-13 class in ``semseg``),
    ``box_object`` int32 [M] (the object id) and ``box_count`` int64 [N] (boxes per image).
    """
    n, h, w = objects.shape
    obj = objects.long()
    k = int(obj.max()) + 1 if obj.numel() else 1
    key = (obj + k * torch.arange(n)[:, None, None]).reshape(-1)
    cols = torch.arange(w).expand(n, h, w).reshape(-1)
    rows = torch.arange(h)[:, None].expand(n, h, w).reshape(-1)
    pixels = torch.bincount(key, minlength=n * k)

    def reduce(v: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        out = torch.full((n * k,), fill, dtype=torch.long)
        return out.scatter_reduce_(0, key, v, how, include_self=False)

    x1, x2 = reduce(cols, "amin", w), reduce(cols, "amax", -1) + 1
    y1, y2 = reduce(rows, "amin", h), reduce(rows, "amax", -1) + 1
    cls = reduce(semseg.reshape(-1).long(), "amax", 0)
    det = torch.as_tensor(DET_OF_CLASS)[cls]
    keep = (pixels >= max(1, min_pixels)) & (torch.arange(n * k) % k > 0) & (det >= 0)
    idx = keep.nonzero()[:, 0]
    return {"boxes": torch.stack([x1, y1, x2, y2], 1)[idx].to(torch.float32).numpy(),
            "box_class": det[idx].to(torch.uint8).numpy(),
            "box_object": (idx % k).to(torch.int32).numpy(),
            "box_count": torch.bincount(idx // k, minlength=n).numpy().astype(np.int64)}


def _render_range(start: int, stop: int, size: tuple[int, int], seed: int,
                  meta: bool = False) -> dict[str, np.ndarray]:
    """Images ``start .. stop-1`` of the sequence defined by ``seed`` (one batch)."""
    scenes_ = [sample_scene(np.random.default_rng([seed, i])) for i in range(start, stop)]
    with torch.inference_mode():
        r = render_batch(scenes_, *size, meta=meta)
        out = {
            "image": r["image"].contiguous().numpy(),
            "semseg": r["semseg"].to(torch.uint8).numpy(),
            "depth": r["depth"][:, None].numpy(),
            "normals": r["normals"].contiguous().numpy(),
            "edges": _edges(r["instance"])[:, None].to(torch.float32).numpy(),
            "classification": np.array([s.room_type for s in scenes_], np.int64),
            **object_boxes(r["objects"], r["semseg"]),
        }
        if meta:
            out |= {"instance": r["instance"].to(torch.int32).numpy(),
                    "objects": r["objects"].to(torch.int32).numpy(),
                    "surface": r["surface"].to(torch.int32).numpy(),
                    "planar": r["planar"].numpy(),
                    "rotation": np.stack([s.rot for s in scenes_]).astype(np.float32),
                    "camera": np.stack([s.cam for s in scenes_]).astype(np.float32),
                    "room": np.stack([s.room for s in scenes_]).astype(np.float32)}
    return out


def _render_many(start: int, stop: int, size: tuple[int, int], seed: int, meta: bool = False,
                 advance: Callable[[int], Any] | None = None) -> dict[str, np.ndarray]:
    """Images ``start .. stop-1``, in batches spread over worker threads with one intra-op
    thread each. Ray casting is a long chain of mid-sized tensor ops: independent chains per
    core beat one chain split across cores with a barrier after every op, and degrade
    gracefully when other processes share the cores (a barrier then waits for a busy core)."""
    chunk = max(1, min(_BATCH, -(-(stop - start) // _WORKERS)))
    ranges = [(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    parts = []
    try:
        with ThreadPoolExecutor(_WORKERS) as pool:
            for part in pool.map(lambda r: _render_range(*r, size, seed, meta), ranges):
                parts.append(part)
                if advance is not None:
                    advance(len(part["classification"]))
    finally:
        torch.set_num_threads(threads)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def render(n: int, size: Sequence[int] = (96, 128), seed: int = 0, return_meta: bool = False,
           start: int = 0) -> dict[str, np.ndarray]:
    """Render images ``start .. start+n-1`` of the scene sequence of ``seed``; arrays are N-first.

    Returns ``image`` uint8 [N,3,H,W], ``semseg`` uint8 [N,H,W], ``depth`` float32 [N,1,H,W],
    ``normals`` float32 [N,3,H,W], ``edges`` float32 [N,1,H,W], ``classification`` int64 [N]
    and the detection boxes of all images, flat (see :func:`object_boxes`): ``boxes`` float32
    [M,4], ``box_class`` uint8 [M], ``box_object`` int32 [M] and ``box_count`` int64 [N].
    With ``return_meta`` also: ``instance`` int32 [N,H,W] (0..5 the room's faces, then one id
    per primitive), ``objects`` int32 [N,H,W] (the object id of every pixel, 0 = the room; a
    box's ``box_object``), ``surface`` int32 [N,H,W] (one id per face of a primitive),
    ``planar`` bool [N,H,W], ``rotation`` float32 [N,3,3] (camera-to-world; the world's y axis
    points up), ``camera`` and ``room`` float32 [N,3] (camera centre; room width, height,
    depth) and the intrinsics ``K`` float32 [3,3] (pixel centres at integer + 0.5).
    """
    h, w = _check(n, size, seed)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ConfigError(f"scenes render: 'start' must be an integer >= 0, got {start!r}")
    out = _render_many(start, start + n, (h, w), seed, return_meta)
    if return_meta:
        f = focal(w)
        out["K"] = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], np.float32)
    return out


# ----------------------------------------------------------------------------- the cache


def split_sizes(n: int, splits: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Images per split: val and test get ``round(n * fraction)`` (at least 1), train the rest."""
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ConfigError(f"scenes splits: expected three non-negative fractions, got {splits!r}")
    total = sum(splits)
    val, test = (max(1, round(n * s / total)) for s in splits[1:])
    if n - val - test < 1:
        raise ConfigError(f"scenes option 'n': {n} images cannot fill train, val and test; "
                          "use n >= 3")
    return {"train": n - val - test, "val": val, "test": test}


def default_root(n: int, size: Sequence[int], seed: int) -> Path:
    """``$MTLCV_CACHE`` (or ``~/.cache/mtlcv``) / ``scenes-n{n}-{H}x{W}-s{seed}``."""
    base = Path(os.environ.get("MTLCV_CACHE") or Path.home() / ".cache" / "mtlcv")
    return base / f"scenes-n{n}-{size[0]}x{size[1]}-s{seed}"


def write_cache(out_dir: str | os.PathLike, n: int = 600, size: Sequence[int] = (96, 128),
                seed: int = 0, splits: Sequence[float] = (0.8, 0.1, 0.1),
                progress: bool = True) -> Path:
    """Render ``n`` images into the cache folder ``out_dir`` (see :func:`_write_cache`); a
    file-system failure (a file in the way, a read-only or full disk) is a one-line DataError
    naming the folder, and leaves no partial file behind."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"scenes cache '{out}' is a file, not a folder; choose another folder")
    try:
        return _write_cache(out, n, size, seed, splits, progress)
    except OSError as exc:
        from ..engine.checkpoint import _reason

        raise DataError(f"cannot write the scenes cache '{out}': {_reason(exc)}") from None


def _write_cache(out_dir: str | os.PathLike, n: int = 600, size: Sequence[int] = (96, 128),
                 seed: int = 0, splits: Sequence[float] = (0.8, 0.1, 0.1),
                 progress: bool = True) -> Path:
    """Render ``n`` images and write ``train.npz``, ``val.npz``, ``test.npz`` and ``meta.json``.

    Arrays are stored losslessly (image and semseg uint8, depth and normals float32, edges uint8,
    the boxes flat as :func:`render` returns them; about 75 kB per 96x128 image, compressed), so
    the ground truth read back is bit-exact.

    Splits are consecutive index ranges (train first). Each file is written under a temporary
    name and renamed when complete, and ``meta.json`` is written last, so an interrupted write
    never leaves a cache that looks complete. Returns the cache folder.
    """
    h, w = _check(n, size, seed)
    sizes = split_sizes(n, splits)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from now on the folder is incomplete

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress("[progress.description]{task.description}", BarColumn(),
                       MofNCompleteColumn(), TimeRemainingColumn())
        bar.start()
        job = bar.add_task(f"rendering scenes {h}x{w}", total=n)
    try:
        start = 0
        for split in SPLITS:
            arrays = _render_many(start, start + sizes[split], (h, w), seed,
                                  advance=None if bar is None else lambda k: bar.advance(job, k))
            arrays["edges"] = arrays["edges"].astype(np.uint8)
            tmp = out / f".{split}.{os.getpid()}.tmp.npz"
            try:
                np.savez_compressed(tmp, **arrays)  # planar normals and labels shrink 20-40x
                os.replace(tmp, out / f"{split}.npz")
            finally:
                tmp.unlink(missing_ok=True)
            start += sizes[split]
    finally:
        if bar is not None:
            bar.stop()
    meta = {"dataset": "scenes", "format": FORMAT, "n": n, "size": [h, w], "seed": seed,
            "splits": sizes, "classes": list(CLASSES), "room_types": list(ROOM_TYPES),
            "det_classes": list(DET_CLASSES), "min_pixels": MIN_PIXELS,
            "hfov_deg": HFOV_DEG, "focal_px": focal(w)}
    tmp = out / f".meta.{os.getpid()}.tmp.json"
    try:
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / "meta.json")
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _read_meta(root: Path) -> dict[str, Any]:
    path = root / "meta.json"
    if not path.is_file():
        raise DataError(f"'{root}' holds no complete scenes cache (no meta.json); run "
                        f"`mtlcv data scenes --out {root}` or let the dataset render it")
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in ("n", "size", "seed", "splits") if k not in meta]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cache file '{path}' is unreadable ({type(e).__name__}: {e}); delete "
                        f"the folder or run `mtlcv data scenes --out {root}`") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"cache '{root}' has format {meta.get('format')!r}, this version reads "
                        f"format {FORMAT}; delete it to re-render")
    problem = _bad_meta(meta)
    if problem:
        raise DataError(f"cache file '{path}' is inconsistent ({problem}); delete the folder or "
                        f"run `mtlcv data scenes --out {root}`")
    return meta


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _bad_meta(meta: dict[str, Any]) -> str | None:
    """What is wrong with a cache's meta.json fields, or None."""
    size, splits = meta["size"], meta["splits"]
    if not (isinstance(size, list) and len(size) == 2 and all(_count(s) and s > 0 for s in size)):
        return f"size {size!r} is not [H, W]"
    if not (isinstance(splits, dict) and all(_count(splits.get(s)) for s in SPLITS)):
        return f"splits {splits!r} is not a count per split ({', '.join(SPLITS)})"
    if not _count(meta["n"]) or not isinstance(meta["seed"], int):
        return f"n {meta['n']!r} or seed {meta['seed']!r} is not an integer"
    return None


def _format(root: Path) -> Any:
    try:
        return json.loads((root / "meta.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _load_split(root: Path, split: str, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    path = root / f"{split}.npz"
    n, (h, w) = meta["splits"][split], meta["size"]
    shapes = {"image": (n, 3, h, w), "semseg": (n, h, w), "depth": (n, 1, h, w),
              "normals": (n, 3, h, w), "edges": (n, 1, h, w), "classification": (n,)}
    hint = (f"delete it or run `mtlcv data scenes --n {meta['n']} --size {h}x{w} "
            f"--seed {meta['seed']} --out {root}`")
    if not path.is_file():
        raise DataError(f"cache file '{path}' is missing; {hint}")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in (*shapes, *BOX_KEYS)}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cache file '{path}' is corrupt or truncated ({type(e).__name__}: "
                        f"{str(e)[:80]}); {hint}") from None
    count = arrays["box_count"]
    if count.dtype != np.int64:  # before summing it: a float count may be NaN
        raise DataError(f"cache file '{path}': box_count has dtype {count.dtype}, expected "
                        f"int64; {hint}")
    m = int(count.sum()) if count.shape == (n,) else -1
    shapes |= {"box_count": (n,), "boxes": (m, 4), "box_class": (m,), "box_object": (m,)}
    for k, shape in shapes.items():
        if arrays[k].shape != shape:
            raise DataError(f"cache file '{path}': {k} has shape {arrays[k].shape}, expected "
                            f"{shape}; {hint}")
    problem = _bad_values(arrays)
    if problem:
        raise DataError(f"cache file '{path}': {problem}; {hint}")
    return arrays


def _bad_values(a: dict[str, np.ndarray]) -> str | None:
    """What is wrong with a split's arrays (dtypes, label ranges, depth, boxes), or None."""
    want = {"image": np.uint8, "semseg": np.uint8, "depth": np.float32, "normals": np.float32,
            "classification": np.int64, "boxes": np.float32, "box_class": np.uint8,
            "box_object": np.int32, "box_count": np.int64}
    for k, dt in want.items():
        if a[k].dtype != dt:
            return f"{k} has dtype {a[k].dtype}, expected {np.dtype(dt).name}"
    seg = a["semseg"]
    bad = seg[(seg >= len(CLASSES)) & (seg != 255)]
    if bad.size:
        return f"semseg holds label {int(bad[0])}, outside [0, {len(CLASSES)}) and not 255"
    cls = a["classification"]
    bad = cls[(cls < 0) | (cls >= len(ROOM_TYPES))]
    if bad.size:
        return f"classification holds label {int(bad[0])}, outside [0, {len(ROOM_TYPES)})"
    if not set(np.unique(a["edges"]).tolist()) <= {0, 1, 255}:
        return "edges holds values other than 0, 1 and 255"
    depth = a["depth"]
    if depth.size and not (depth > 0).any():
        return "depth has no positive value (every pixel would be missing: a depth loss of 0)"
    if np.isinf(depth).any():
        return "depth holds infinite values"
    if not np.isfinite(a["normals"]).all():
        return "normals hold NaN or infinite values"
    return _bad_boxes(a)


def _bad_boxes(a: dict[str, np.ndarray]) -> str | None:
    """What is wrong with how a split's detection boxes are laid out, or None. Their values
    (sizes, classes, coordinates) are the detection task's to check, per image and with every
    problem listed, in ``mtlcv data check`` and in every batch (``Detection.check_target``)."""
    if (a["box_count"] < 0).any():
        return f"box_count holds {int(a['box_count'].min())}, a negative number of boxes"
    return None


# ----------------------------------------------------------------------------- the dataset


class ScenesDataset(MTLDataset):
    """One split of a scenes cache, held in memory; items follow the batch contract."""

    targets = ("semseg", "depth", "normals", "edges", "classification", "detection")
    task_options = {"semseg": {"num_classes": len(CLASSES)},
                    "classification": {"num_classes": len(ROOM_TYPES)},
                    "detection": {"num_classes": len(DET_CLASSES)}}
    class_names = {"semseg": list(CLASSES), "classification": list(ROOM_TYPES),
                   "detection": list(DET_CLASSES)}

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 augment: bool = False, n_train: int | None = None) -> None:
        if split not in SPLITS:
            raise ConfigError(f"scenes: unknown split {split!r}; valid: {', '.join(SPLITS)}")
        self.root, self.split, self.augment = Path(root), split, augment
        self.meta = _read_meta(self.root)
        self.arrays = {k: torch.from_numpy(v)
                       for k, v in _load_split(self.root, split, self.meta).items()}
        if n_train is not None:
            have = self.meta["splits"]["train"]
            if isinstance(n_train, bool) or not isinstance(n_train, int) or not (
                    1 <= n_train <= have):
                raise ConfigError(f"scenes option 'n_train': expected 1 to {have} (the training "
                                  f"images of the cache, n={self.meta['n']}), got {n_train!r}")
            if split == "train":
                # per-image arrays by image; the flat box arrays up to the last kept image's boxes
                n_boxes = int(self.arrays["box_count"][:n_train].sum())
                self.arrays = {k: v[:n_boxes] if k in BOX_KEYS[:3] else v[:n_train]
                               for k, v in self.arrays.items()}
        counts = self.arrays["box_count"]
        self.box_start = torch.cumsum(counts, 0) - counts

    def __len__(self) -> int:
        return len(self.arrays["classification"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        a = self.arrays
        item = {"image": a["image"][i].float() / 255, "semseg": a["semseg"][i].long(),
                "depth": a["depth"][i].clone(), "normals": a["normals"][i].clone(),
                "edges": a["edges"][i].float(), "classification": a["classification"][i].clone(),
                "detection": self.boxes(i)}
        if self.augment and torch.rand(()) < 0.5:  # torch RNG: torch.manual_seed reproduces it
            item = hflip(item)
        return item

    def boxes(self, i: int) -> Boxes:
        """The detection target of image ``i``."""
        a, start = self.arrays, int(self.box_start[i])
        stop = start + int(a["box_count"][i])
        return Boxes(a["boxes"][start:stop].clone(), a["box_class"][start:stop].long())


@DATASETS.register("scenes", help="procedural indoor scenes (embedded, rendered to a cache)")
def scenes(split: str = "train", root: str | None = None, augment: bool = False, n: int = 600,
           size: Sequence[int] = (96, 128), seed: int = 0,
           n_train: int | None = None) -> ScenesDataset:
    """The scenes dataset; renders its cache on first use (``root`` default: :func:`default_root`).

    A cache made with other ``n``/``size``/``seed`` is an error (never silently replaced).
    ``n_train`` trains on the first ``n_train`` training images only, val and test unchanged:
    training sets of several sizes then share one cache and are scored on the same images.
    """
    if split not in SPLITS:
        raise ConfigError(f"scenes: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    h, w = _check(n, size, seed)
    folder = Path(root).expanduser() if root is not None else default_root(n, (h, w), seed)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data.root '{folder}' is a file; expected a scenes cache folder (or a "
                        "folder to render one into)")
    if not (folder / "meta.json").is_file():
        print(f"scenes: no cache in {folder}; rendering {n} images at {h}x{w} (seed {seed}) once")
        write_cache(folder, n=n, size=(h, w), seed=seed, progress=True)
    elif root is None and _format(folder) != FORMAT:  # the default cache is ours to renew
        print(f"scenes: the cache in {folder} has format {_format(folder)!r}, this version "
              f"reads format {FORMAT}; rendering it again")
        write_cache(folder, n=n, size=(h, w), seed=seed, progress=True)
    meta = _read_meta(folder)
    have = (meta["n"], list(meta["size"]), meta["seed"])
    if have != (n, [h, w], seed):
        raise DataError(f"cache '{folder}' holds n={have[0]}, size={have[1][0]}x{have[1][1]}, "
                        f"seed={have[2]} but n={n}, size={h}x{w}, seed={seed} was asked for; "
                        "match data.options to it, or point data.root at another folder")
    return ScenesDataset(folder, split, augment, n_train)


# ----------------------------------------------------------------------------- object crops


class ScenesObjects(MTLDataset):
    """Image classification of the scenes' objects: one item per box of a split, the box (with a
    ``margin`` on each side, clipped to the image) resized to ``crop`` x ``crop`` pixels,
    labelled with its detection class (:data:`DET_CLASSES`). The small-image problem LeNet-5
    was made for, drawn from the same scenes as the dense tasks. Boxes smaller than
    ``min_side`` pixels on a side are left out."""

    targets = ("classification",)
    task_options = {"classification": {"num_classes": len(DET_CLASSES)}}

    def __init__(self, scenes_split: ScenesDataset, augment: bool = False, crop: int = 32,
                 margin: float = 0.1, min_side: int = 4) -> None:
        self.scenes, self.augment, self.crop, self.margin = scenes_split, augment, crop, margin
        a = scenes_split.arrays
        wh = a["boxes"][:, 2:] - a["boxes"][:, :2]
        image = torch.repeat_interleave(torch.arange(len(a["box_count"])), a["box_count"])
        keep = (wh >= min_side).all(1)
        self.items = torch.stack([image, torch.arange(len(image))], 1)[keep]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j = (int(v) for v in self.items[k])
        a = self.scenes.arrays
        h, w = a["image"].shape[-2:]
        x1, y1, x2, y2 = a["boxes"][j].tolist()
        mx, my = self.margin * (x2 - x1), self.margin * (y2 - y1)
        x1, y1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
        x2, y2 = min(w, int(math.ceil(x2 + mx))), min(h, int(math.ceil(y2 + my)))
        image = a["image"][i, :, y1:y2, x1:x2].float() / 255
        image = torch.nn.functional.interpolate(image[None], size=(self.crop, self.crop),
                                                mode="bilinear", align_corners=False)[0]
        item = {"image": image, "classification": a["box_class"][j].long()}
        if self.augment and torch.rand(()) < 0.5:
            item = hflip(item)
        return item


@DATASETS.register("scenes-objects", help="object crops of the scenes, classified (LeNet-size)")
def scenes_objects(split: str = "train", root: str | None = None, augment: bool = False,
                   n: int = 600, size: Sequence[int] = (96, 128), seed: int = 0, crop: int = 32,
                   margin: float = 0.1, min_side: int = 4) -> ScenesObjects:
    """Object crops of a scenes cache (made on first use, as for ``scenes``) as 10-class image
    classification; ``crop`` is the side of the square crops (32: LeNet-5's input)."""
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 4:
        raise ConfigError(f"scenes-objects option 'crop': expected an integer >= 4, got {crop!r}")
    return ScenesObjects(scenes(split, root, False, n, size, seed), augment, crop, margin,
                         min_side)
