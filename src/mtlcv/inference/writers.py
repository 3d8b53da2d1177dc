"""Per-task output files of ``mtlcv predict``, one writer per task KIND.

:data:`WRITERS` maps a registered task kind to its :class:`Writer`; a task is written by the
writer of its kind whatever its name (``left`` and ``right`` of kind ``classification`` both get
the classification writer). A new kind adds one entry with :func:`register_writer`; a kind
without one has its raw output saved as ``.npy``.

For an image ``photo.jpg`` and a task named ``T``, files go to ``OUT/T/``:

=================  ===========================================================================
``semseg``         ``photo.png``: colours of the fixed palette (:func:`palette`), legend in
                   ``OUT/T.legend.json`` and ``OUT/T.legend.png``; ``photo_labels.png``: the
                   class ids themselves (8-bit grey, 16-bit above 256 classes)
``depth``          ``photo.png``: turbo colour map, near = red, far = blue, from the 1st to the
                   99th percentile of the image's depths (the range is in predictions.json);
                   ``photo_mm.png``: 16-bit depth in millimetres (0 where the prediction is
                   <= 0; clipped at 65.535 m)
``normals``        ``photo.png``: RGB = (n + 1) / 2 of the unit normal in the camera frame (x
                   right, y down, z forward): a wall facing the camera, n = (0, 0, -1), is
                   olive (128, 128, 0), a floor, n = (0, -1, 0), purple (128, 0, 128)
``edges``          ``photo.png``: edge probability (grey); ``photo_edges.png``: the binary map
                   at the task's threshold
``classification`` ``photo.json``: class id, name, probability and the top 5; ``photo_overlay.png``:
                   the image with the predicted class written on it
``detection``      ``photo.json``: ``{"size": [H, W], "detections": [{"class", "name", "score",
                   "box": [x1, y1, x2, y2]}, ...]}``, best first, boxes in the original image's
                   pixels (edges: a box covering pixel columns 0..9 has x1 = 0, x2 = 10); an
                   empty list when nothing is detected. ``photo_overlay.png``: the image with
                   every box outlined in its class's palette colour (:func:`palette`) and
                   labelled ``name score``, the best drawn last (on top)
=================  ===========================================================================

Detection is decoded (the task's ``postprocess``: score threshold, per-class NMS) at the model's
input size, where its box distances are in pixels, and the boxes are then mapped to the image
through the :class:`~mtlcv.inference.predictor.Placement` (the predictor's ``DECODERS``); its
writer receives the decoded boxes, not a map.

Every writer also returns a small JSON record for ``OUT/predictions.json``. ``raw_output``
says what the raw head output of the kind is (exported graphs' outputs are raw).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tasks.base import Task
from .predictor import Placement


@dataclass
class Target:
    """Where one task's outputs of one image go: ``out / task / (stem + suffix)``."""

    out: Path
    task: str
    stem: str
    class_names: list[str] | None = None

    def path(self, suffix: str) -> Path:
        folder = self.out / self.task
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{self.stem}{suffix}"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()


class Writer:
    """Writes one task kind's prediction of one image (see the module docstring)."""

    #: what the raw head output of this kind is (for export descriptions)
    raw_output: str = "the raw head output"

    def begin(self, out: Path, name: str, task: Task, class_names: list[str] | None) -> list[str]:
        """Once per run, before any image: shared files (legends); returns their paths."""
        return []

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        """Write ``raw`` for ``image`` ``[3, H, W]``: the task's raw output at the image's size,
        or, for a kind decoded before mapping back (detection), its decoded prediction in the
        image's coordinates."""
        raise NotImplementedError


#: task kind -> its writer
WRITERS: dict[str, Writer] = {}


def register_writer(kind: str) -> Callable[[type[Writer]], type[Writer]]:
    """Class decorator: ``@register_writer("detection")`` makes that kind's writer."""

    def deco(cls: type[Writer]) -> type[Writer]:
        if kind in WRITERS:
            raise ValueError(f"a writer for task kind {kind!r} is registered twice")
        WRITERS[kind] = cls()
        return cls

    return deco


def writer_for(kind: str) -> Writer:
    """The writer of ``kind`` (:class:`RawWriter` for a kind that has none)."""
    return WRITERS.get(kind, RAW)


# ---------------------------------------------------------------------- helpers
def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` floats in [0, 1] -> ``H x W x 3`` uint8."""
    a = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return a.permute(1, 2, 0).numpy()


def palette(n: int) -> np.ndarray:
    """``n x 3`` uint8 colours: the PASCAL VOC colour map (Everingham et al., IJCV 2010).

    The bits of ``i`` are spread over R, G and B from the most significant bit down, so
    neighbouring ids get very different colours. Entry 0 (black) is skipped: class ``c`` has
    VOC colour ``c + 1``, so no class is drawn black (black reads as "nothing").
    """

    def voc(i: int) -> tuple[int, int, int]:
        r = g = b = 0
        for j in range(8):
            r |= ((i >> 0) & 1) << (7 - j)
            g |= ((i >> 1) & 1) << (7 - j)
            b |= ((i >> 2) & 1) << (7 - j)
            i >>= 3
        return r, g, b

    return np.array([voc(i + 1) for i in range(n)], dtype=np.uint8)


def _font(size: int):  # noqa: ANN202 - PIL is imported lazily
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _names(class_names: list[str] | None, n: int) -> list[str]:
    if class_names and len(class_names) == n:
        return list(class_names)
    return [f"class {i}" for i in range(n)]


# ---------------------------------------------------------------------- writers
@register_writer("semseg")
class SegmentationWriter(Writer):
    raw_output = "logits [B, classes, H, W]; the class is the argmax over channels"

    def begin(self, out: Path, name: str, task: Task, class_names: list[str] | None) -> list[str]:
        from PIL import Image, ImageDraw

        n = task.channels
        colours, names = palette(n), _names(class_names, n)
        legend = [
            {"id": i, "name": names[i], "color": colours[i].tolist()} for i in range(n)
        ]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.legend.json").write_text(json.dumps({"classes": legend}, indent=1))
        row, font = 20, _font(14)
        img = Image.new("RGB", (240, row * n + 4), "white")
        draw = ImageDraw.Draw(img)
        for i in range(n):
            y = 2 + i * row
            draw.rectangle((4, y + 2, 34, y + row - 2), fill=tuple(colours[i].tolist()))
            draw.text((42, y + 2), f"{i} {names[i]}", fill="black", font=font)
        img.save(out / f"{name}.legend.png")
        return [f"{name}.legend.json", f"{name}.legend.png"]

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        labels = task.postprocess(raw[None])[0].numpy()
        n = task.channels
        colour = target.path(".png")
        _save_png(palette(n)[labels], colour)
        ids = target.path("_labels.png")
        _save_png(labels.astype(np.uint8 if n <= 256 else np.uint16), ids)
        counts = np.bincount(labels.ravel(), minlength=n)
        names = _names(target.class_names, n)
        share = {names[i]: round(float(c) / labels.size, 4) for i, c in enumerate(counts) if c}
        share = dict(sorted(share.items(), key=lambda kv: -kv[1]))
        return {"files": [target.rel(colour), target.rel(ids)], "pixel_share": share}


@register_writer("depth")
class DepthWriter(Writer):
    raw_output = "depth in metres [B, 1, H, W]"

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        import matplotlib

        depth = task.postprocess(raw[None])[0, 0].numpy().astype(np.float64)
        lo, hi = (float(v) for v in np.percentile(depth, [1, 99]))
        norm = np.clip((depth - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(depth)
        lut = (matplotlib.colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255).round()
        colour = target.path(".png")
        # turbo runs blue -> red: reversed, so near is red and far is blue
        _save_png(lut.astype(np.uint8)[((1 - norm) * 255).round().astype(int)], colour)
        mm = target.path("_mm.png")
        _save_png(np.clip(np.round(depth * 1000), 0, 65535).astype(np.uint16), mm)
        return {
            "files": [target.rel(colour), target.rel(mm)],
            "min_m": round(float(depth.min()), 4),
            "median_m": round(float(np.median(depth)), 4),
            "max_m": round(float(depth.max()), 4),
            "colour_range_m": [round(lo, 4), round(hi, 4)],
        }


@register_writer("normals")
class NormalsWriter(Writer):
    raw_output = "unnormalised normals [B, 3, H, W] (x right, y down, z forward); L2-normalise"

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        n = task.postprocess(raw[None])[0]
        colour = target.path(".png")
        _save_png(to_uint8((n + 1) / 2), colour)
        return {"files": [target.rel(colour)]}


@register_writer("edges")
class EdgesWriter(Writer):
    raw_output = "edge logits [B, 1, H, W]; sigmoid > threshold is an edge"

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        prob = torch.sigmoid(raw[0])
        grey = target.path(".png")
        _save_png((prob * 255).round().to(torch.uint8).numpy(), grey)
        binary = target.path("_edges.png")
        edges = task.postprocess(raw[None])[0, 0].numpy()
        _save_png((edges * 255).astype(np.uint8), binary)
        return {"files": [target.rel(grey), target.rel(binary)]}


@register_writer("classification")
class ClassificationWriter(Writer):
    raw_output = "logits [B, classes]; the class is the argmax"

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        from PIL import Image, ImageDraw

        prob = torch.softmax(raw.double(), dim=0)
        names = _names(target.class_names, task.channels)
        order = torch.argsort(prob, descending=True)[:5].tolist()
        top = [
            {"class": i, "name": names[i], "probability": round(float(prob[i]), 4)} for i in order
        ]
        record = {**top[0], "top": top}
        js = target.path(".json")
        js.write_text(json.dumps(record, indent=1))
        img = Image.fromarray(to_uint8(image))
        draw = ImageDraw.Draw(img)
        size = max(10, img.height // 16)
        font = _font(size)
        text = f"{target.task}: {top[0]['name']} {100 * top[0]['probability']:.0f}%"
        box = draw.textbbox((0, 0), text, font=font)
        draw.rectangle((0, 0, box[2] + 2 * (size // 3), box[3] + 2 * (size // 3)), fill="black")
        draw.text((size // 3, size // 3), text, fill="white", font=font)
        overlay = target.path("_overlay.png")
        img.save(overlay)
        return {"files": [target.rel(js), target.rel(overlay)], **record}


@register_writer("detection")
class DetectionWriter(Writer):
    raw_output = (
        "[B, classes + 5, H, W] at the input size: class logits (the task adds its prior "
        "log(0.01 / 0.99)), box distances l, t, r, b (pixels = 16 * softplus), a centerness "
        "logit; decode (NMS) with the task's postprocess, which is not in the graph"
    )

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        from PIL import Image, ImageDraw

        n = task.num_classes
        names, colours = _names(target.class_names, n), palette(n)
        detections = [
            {"class": c, "name": names[c], "score": round(s, 4), "box": [round(v, 2) for v in b]}
            for b, s, c in zip(
                raw["boxes"].tolist(), raw["scores"].tolist(), raw["labels"].tolist()
            )
        ]
        js = target.path(".json")
        rows = ",\n  ".join(json.dumps(d) for d in detections)  # one detection per line
        rows = f"\n  {rows}\n " if rows else ""
        size = json.dumps(list(place.size))
        js.write_text(f'{{\n "size": {size},\n "detections": [{rows}]\n}}\n')
        img = Image.fromarray(to_uint8(image))
        draw = ImageDraw.Draw(img)
        h, w = place.size
        width = max(1, round(min(h, w) / 150))
        font = _font(max(10, min(h, w) // 30))
        pad = 2
        for det, box in zip(reversed(detections), reversed(raw["boxes"].tolist())):
            # box edges -> the pixels the box covers: columns floor(x1) .. ceil(x2) - 1
            x1, y1 = int(np.floor(box[0])), int(np.floor(box[1]))
            x2, y2 = max(x1, int(np.ceil(box[2])) - 1), max(y1, int(np.ceil(box[3])) - 1)
            colour = tuple(colours[det["class"]].tolist())
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            text = f"{det['name']} {det['score']:.2f}"
            tb = draw.textbbox((0, 0), text, font=font)
            tw, th = tb[2] - tb[0] + 2 * pad, tb[3] - tb[1] + 2 * pad
            # the label above the box (inside its top edge where there is no room), moved left
            # where it would leave the image
            tx, ty = max(0, min(x1, w - tw)), (y1 - th if y1 >= th else y1)
            draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
            dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 128
            draw.text((tx + pad - tb[0], ty + pad - tb[1]), text, font=font,
                      fill="white" if dark else "black")  # fmt: skip
        overlay = target.path("_overlay.png")
        img.save(overlay)
        per_class: dict[str, int] = {}
        for det in detections:
            per_class[det["name"]] = per_class.get(det["name"], 0) + 1
        return {
            "files": [target.rel(js), target.rel(overlay)],
            "count": len(detections),
            "per_class": per_class,
        }


class RawWriter(Writer):
    """The fallback for a kind without a writer: the raw output as ``.npy``."""

    def write(
        self, target: Target, task: Task, raw: Any, image: torch.Tensor, place: Placement
    ) -> dict[str, Any]:
        path = target.path(".npy")
        np.save(path, raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw))
        return {"files": [target.rel(path)]}


RAW = RawWriter()
