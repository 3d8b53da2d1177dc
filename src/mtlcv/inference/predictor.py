"""Load a trained model from its checkpoint and predict on images of any size.

Example (the README's)::

    import mtlcv
    model = mtlcv.load("runs/demo/hps/seed0")        # a run directory or a .pt checkpoint
    out = model.predict("photo.jpg")                  # a path, PIL image, array or tensor
    out["semseg"]                                     # LongTensor [H, W] of class ids

:func:`load` needs only the checkpoint: its metadata (:mod:`mtlcv.engine.metadata`) names the
architecture, the tasks and the input size. A checkpoint written before checkpoints carried
metadata is described from its run directory's ``config.yaml`` instead (the dataset is opened
once to recover the task options).

Images of any size are mapped to the size the model was trained at and the outputs back to the
image's own size (:class:`Placement`): ``fit="resize"`` stretches the image (what training did
with every dataset here), ``fit="pad"`` keeps its aspect ratio, scaling it to fit and padding
the rest with the model's mean colour (zero after the model's normalisation); the padded
border is cut from the outputs before they are resized back.

A dense output whose values are geometry in the model input's pixels cannot be resized as a map:
detection's raw output holds box distances ``(l, t, r, b)`` in input pixels, so a map stretched
to twice the size would still say "8 px" where the object now spans 16. Such a task kind
registers a *decoder* (:func:`register_decoder`): its raw output is decoded at the model's
input size (detection: the task's own :meth:`~mtlcv.tasks.detection.Detection.postprocess`,
with its NMS) and the decoded prediction mapped to the image through the :class:`Placement`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.metadata import check
from ..errors import CheckpointError, ConfigError, DataError, MtlcvError
from ..models.weights import state_problems
from ..tasks.base import Task

#: options that only initialise parameters (from a pretrained file or another run) before
#: training; the checkpoint's state dict replaces them, so they are dropped when rebuilding a
#: model for inference, where those files may not exist
INIT_ONLY = {"backbone": ("weights",), "options": ("init_from",)}
FITS = ("resize", "pad")


@dataclass(frozen=True)
class Placement:
    """Where an image of ``size`` (H, W) sits in the model input of ``input_size`` (h, w).

    The image occupies the rectangle ``top, left, height, width`` of the input (the rest is
    padding). :meth:`to_image` maps input pixel coordinates to image coordinates, for outputs
    that are not maps (e.g. boxes).
    """

    size: tuple[int, int]
    input_size: tuple[int, int]
    top: int
    left: int
    height: int
    width: int

    def to_image(self, y: Any, x: Any) -> tuple[Any, Any]:
        """Input coordinates (pixel edges) -> image coordinates (floats or tensors)."""
        return (
            (y - self.top) * self.size[0] / self.height,
            (x - self.left) * self.size[1] / self.width,
        )

    def boxes_to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``[N, 4]`` ``(x1, y1, x2, y2)`` in input pixels -> in image pixels, clipped to
        the image (a box reaching into ``fit="pad"``'s border ends at the image's edge)."""
        y1, x1 = self.to_image(boxes[:, 1], boxes[:, 0])
        y2, x2 = self.to_image(boxes[:, 3], boxes[:, 2])
        h, w = self.size
        return torch.stack(
            [x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], 1
        ).reshape(-1, 4)


#: task kind -> decoder ``(task, raw [C, h, w] at the model's input size, placement) ->
#: prediction in the image's coordinates (on the CPU)``, for kinds whose raw map holds
#: input-pixel geometry and so is decoded before it is mapped back (see the module docstring)
DECODERS: dict[str, Callable[[Task, torch.Tensor, Placement], Any]] = {}


def register_decoder(
    kind: str,
) -> Callable[[Callable[[Task, torch.Tensor, Placement], Any]], Callable[..., Any]]:
    """Decorator: ``@register_decoder("detection")`` decodes that kind before mapping back."""

    def deco(fn: Callable[[Task, torch.Tensor, Placement], Any]) -> Callable[..., Any]:
        if kind in DECODERS:
            raise ValueError(f"a decoder for task kind {kind!r} is registered twice")
        DECODERS[kind] = fn
        return fn

    return deco


@register_decoder("detection")
def decode_boxes(task: Task, raw: torch.Tensor, place: Placement) -> dict[str, torch.Tensor]:
    """One image's detections: ``task.postprocess`` at the model's input size (distances are in
    input pixels there), the boxes then mapped to the image by ``place``.

    Returns ``{"boxes": float [N, 4] (x1, y1, x2, y2) in image pixels, "scores": float [N],
    "labels": long [N]}``, best first, on the CPU. A box left without area once clipped to the
    image (one found wholly in ``fit="pad"``'s border) is dropped with its score and label.
    """
    det = task.postprocess(raw[None].float())[0]
    boxes = place.boxes_to_image(det["boxes"].float().cpu())
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {
        "boxes": boxes[keep],
        "scores": det["scores"].float().cpu()[keep],
        "labels": det["labels"].long().cpu()[keep],
    }


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    # antialiasing when shrinking: a 480x640 photo brought to 96x128 must not alias
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


class Predictor:
    """A trained multi-task model, ready to predict (what :func:`load` returns).

    Attributes:
        tasks: ``{name: Task}`` in the model's order; ``task.kind`` is the registered task
            kind (``semseg``, ``depth``, ...), ``task.postprocess`` maps a raw output to the
            prediction.
        class_names: ``{name: [class names] or None}`` for tasks whose checkpoint names them.
        input_size: ``(H, W)`` the model was trained at (None: images are used at their size).
        meta: the checkpoint's metadata (:mod:`mtlcv.engine.metadata`).
        model: the ``torch.nn.Module`` (in eval mode, on ``device``).
        source: the checkpoint file.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tasks: dict[str, Task],
        meta: dict[str, Any],
        device: torch.device,
        source: Path | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.tasks = tasks
        self.meta = meta
        self.device = device
        self.source = source
        size = meta["input"].get("size")
        self.input_size: tuple[int, int] | None = (int(size[0]), int(size[1])) if size else None
        self.class_names = {n: s.get("class_names") for n, s in meta["tasks"].items()}
        norm = meta["input"].get("normalization")
        #: padding colour for fit="pad": the model's mean, i.e. zero after its normalisation
        self.fill = tuple(norm["mean"]) if norm else (0.5, 0.5, 0.5)

    def __repr__(self) -> str:
        tasks = ", ".join(f"{n} ({t.kind})" if t.kind != n else n for n, t in self.tasks.items())
        size = "x".join(map(str, self.input_size)) if self.input_size else "any"
        return (
            f"Predictor({self.meta['model']['arch']}, tasks: {tasks}; input {size}; "
            f"{self.device})"
        )

    # ------------------------------------------------------------------ public
    def predict(
        self,
        images: Any,
        *,
        raw: bool = False,
        fit: str = "resize",
        batch_size: int = 16,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Predict every task on one image, a batch or a list of images.

        Args:
            images: one image: a path, a PIL image, a NumPy array ``[H, W, 3]`` (or ``[H, W]``
                greyscale; uint8 0..255 or floats in [0, 1]) or a tensor ``[3, H, W]`` (uint8
                or floats in [0, 1]); a batch: an array ``[B, H, W, 3]`` or a tensor
                ``[B, 3, H, W]``; or a list of single images of any sizes.
            raw: return the raw head outputs (logits, unnormalised normals) instead of the
                post-processed predictions.
            fit: ``"resize"`` (stretch to the model's input size) or ``"pad"`` (keep the
                aspect ratio, pad); outputs always come back at each image's own size.
            batch_size: images per forward pass.

        Returns:
            ``{task: output}`` on the CPU, each shaped like the batch contract's target at the
            image's size (``semseg``: long ``[B, H, W]`` class ids; ``depth``: ``[B, 1, H, W]``
            metres; ``normals``: ``[B, 3, H, W]`` unit vectors; ``edges``: bool
            ``[B, 1, H, W]``; ``classification``: long ``[B]``), without the ``B`` axis for a
            single image; a list of such dicts for a list of images. ``detection`` gives per
            image a dict ``{"boxes": float [N, 4] (x1, y1, x2, y2) in the image's pixels,
            "scores": float [N], "labels": long [N]}``, best first (the task's decoding and
            NMS at the model's input size, the boxes mapped to the image): that dict for a
            single image, a list of B of them for a batch. With ``raw=True`` the channels
            axis is kept (``[B, C, H, W]`` or ``[B, C]``); a kind decoded before mapping back
            (detection) gives its raw map at the model's input size instead (``[B, C, h, w]``,
            as an exported graph does; ``prepare`` gives each image's :class:`Placement`).
        """
        decode = not raw
        if isinstance(images, (list, tuple)):
            tensors = [as_image(im) for im in images]
            outs = self.predict_raw(tensors, fit=fit, batch_size=batch_size, decode=decode)
            return [self._finish({n: _stack([v]) for n, v in o.items()}, raw, 0) for o, _ in outs]
        batch = as_batch(images)
        outs = self.predict_raw(list(batch), fit=fit, batch_size=batch_size, decode=decode)
        outs = [o for o, _ in outs]
        stacked = {n: _stack([o[n] for o in outs]) for n in self.tasks}
        return self._finish(stacked, raw, None if batch_is_batched(images) else 0)

    def predict_raw(
        self,
        images: Sequence[torch.Tensor],
        *,
        fit: str = "resize",
        batch_size: int = 16,
        decode: bool = True,
    ) -> list[tuple[dict[str, Any], Placement]]:
        """Raw outputs of every image (``[3, H, W]`` floats in [0, 1]) at its own size.

        Dense outputs are cut to the image's rectangle and resized bilinearly to ``(H, W)``
        (logits before the argmax, so the label map is smooth); image-level outputs are as
        the model gave them. A kind with a decoder (:data:`DECODERS`: detection) is decoded at
        the model's input size and mapped to the image (its prediction, not a raw map), or,
        with ``decode=False``, left as its raw map at the model's input size. Returns
        ``[({task: [C, H, W] or [C] or decoded}, Placement), ...]`` on the CPU, in order.
        """
        if fit not in FITS:
            raise ConfigError(f"fit: got {fit!r}, expected one of {', '.join(FITS)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size: got {batch_size}, expected a positive integer")
        prepared = [self.prepare(im, fit) for im in images]
        results: list[tuple[dict[str, Any], Placement]] = []
        i = 0
        while i < len(prepared):
            # one forward per run of equal input sizes (all of them unless input_size is None)
            j = i + 1
            shape = prepared[i][0].shape
            while j < len(prepared) and j - i < batch_size and prepared[j][0].shape == shape:
                j += 1
            x = torch.stack([p[0] for p in prepared[i:j]]).to(self.device)
            # no_grad rather than inference_mode: the outputs are ordinary tensors, which the
            # caller may modify in place
            with torch.no_grad():
                out = self.model(x)
                for k, (_, place) in enumerate(prepared[i:j]):
                    restored = {
                        n: self.restore(out[n][k], n, place, decode=decode) for n in self.tasks
                    }
                    results.append((restored, place))
            i = j
        return results

    # ------------------------------------------------------------------ geometry
    def prepare(self, image: torch.Tensor, fit: str = "resize") -> tuple[torch.Tensor, Placement]:
        """``[3, H, W]`` image -> (model input ``[3, h, w]``, its :class:`Placement`)."""
        h0, w0 = int(image.shape[-2]), int(image.shape[-1])
        size = self.input_size or (h0, w0)
        if fit == "resize" or size == (h0, w0):
            place = Placement((h0, w0), size, 0, 0, size[0], size[1])
            return _resize(image[None].float(), size)[0], place
        scale = min(size[0] / h0, size[1] / w0)
        rh, rw = max(1, min(size[0], round(h0 * scale))), max(1, min(size[1], round(w0 * scale)))
        top, left = (size[0] - rh) // 2, (size[1] - rw) // 2
        canvas = torch.tensor(self.fill, dtype=torch.float32).view(3, 1, 1).repeat(1, *size)
        canvas[:, top : top + rh, left : left + rw] = _resize(image[None].float(), (rh, rw))[0]
        return canvas, Placement((h0, w0), size, top, left, rh, rw)

    def restore(self, out: Any, task: str, place: Placement, *, decode: bool = True) -> Any:
        """One image's raw output at the model size -> at the image's size, on the CPU.

        A kind with a decoder (:data:`DECODERS`) is decoded at the model size and mapped by
        ``place`` (or, with ``decode=False``, returned as it is, at the model size).
        """
        if not isinstance(out, torch.Tensor):
            return out  # a structured prediction (e.g. boxes): its writer maps it with place
        t = self.tasks[task]
        decoder = DECODERS.get(getattr(t, "kind", t.name))  # a task built by hand has no kind
        if decoder is not None:  # input-pixel geometry: never resized as a map
            return decoder(t, out, place) if decode else out.float().cpu()
        out = out.float()
        if t.dense:  # on the model's device: resizing there is the fast part
            p = place
            out = out[:, p.top : p.top + p.height, p.left : p.left + p.width]
            if (p.height, p.width) != p.size:
                out = F.interpolate(out[None], p.size, mode="bilinear", align_corners=False)[0]
        return out.cpu()

    def _finish(
        self, outs: dict[str, torch.Tensor], raw: bool, index: int | None
    ) -> dict[str, torch.Tensor]:
        """Batched raw outputs -> post-processed (unless ``raw``); item ``index`` if not None."""
        if not raw:  # structured or decoded predictions (dicts per image) stay as they are
            outs = {
                n: self.tasks[n].postprocess(o) if isinstance(o, torch.Tensor) else o
                for n, o in outs.items()
            }
        return outs if index is None else {n: o[index] for n, o in outs.items()}


def _stack(items: list[Any]) -> Any:
    """Per-image outputs -> one batch: stacked tensors, else the list itself."""
    return torch.stack(items) if all(isinstance(t, torch.Tensor) for t in items) else items


# ---------------------------------------------------------------------- inputs
_WIDE_INTS = tuple(
    getattr(torch, n) for n in ("int16", "int32", "int64", "uint16") if hasattr(torch, n)
)


def _from_values(t: torch.Tensor, what: str) -> torch.Tensor:
    """uint8/uint16 -> [0, 1] floats; floats must already be in [0, 1]."""
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype in _WIDE_INTS:  # 16-bit images
        return t.float() / 65535.0
    if t.dtype == torch.bool or not t.dtype.is_floating_point:
        raise DataError(f"{what}: dtype {t.dtype}, expected uint8 or floats in [0, 1]")
    t = t.float()
    if t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6):
        raise DataError(
            f"{what}: values span [{t.min().item():.4g}, {t.max().item():.4g}]; expected floats "
            "in [0, 1] (or uint8 0..255)"
        )
    return t.clamp(0.0, 1.0)


def _channels(t: torch.Tensor, what: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``[C, H, W]`` with C in {1, 3, 4} -> ``[3, H, W]`` (grey repeated, alpha dropped)."""
    if t.shape[0] == 1:
        return t.repeat(3, 1, 1)
    if t.shape[0] in (3, 4):
        return t[:3]
    raise DataError(f"{what}: shape {shape} has {t.shape[0]} channels, expected 1, 3 or 4")


def as_image(image: Any) -> torch.Tensor:
    """One image (path, PIL image, array ``[H, W(, C)]``, tensor ``[C, H, W]``) -> ``[3,H,W]``."""
    from .images import pil_to_tensor, read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if type(image).__module__.startswith("PIL."):
        return pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        shape = image.shape
        if image.ndim not in (2, 3):
            raise DataError(f"image array: shape {shape}, expected [H, W, 3] or [H, W]")
        t = torch.from_numpy(np.array(image))  # a copy: the array may be read-only
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        return _channels(_from_values(t, "image array"), "image array", shape)
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3:
            raise DataError(f"image tensor: shape {shape}, expected [3, H, W]")
        return _channels(_from_values(image.detach().cpu(), "image tensor"), "image tensor", shape)
    raise DataError(
        f"image: got {type(image).__name__}, expected a path, a PIL image, a NumPy array or a "
        "tensor"
    )


def batch_is_batched(images: Any) -> bool:
    """True for a 4-D array or tensor (a batch), False for a single image."""
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def as_batch(images: Any) -> torch.Tensor:
    """One image or a batch (array ``[B, H, W, C]``, tensor ``[B, C, H, W]``) -> ``[B,3,H,W]``."""
    if not batch_is_batched(images):
        return as_image(images)[None]
    if isinstance(images, np.ndarray):
        return torch.stack([as_image(im) for im in images])
    return torch.stack([as_image(im) for im in images.detach().cpu()])


# ---------------------------------------------------------------------- loading
def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(checkpoint file, run directory or None) for a run directory or a checkpoint file.

    A run directory gives its ``best.pt`` (else ``last.pt``); a file's folder counts as its
    run directory when it holds a ``config.yaml``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name, p
        raise CheckpointError(f"{str(p)!r} holds no best.pt or last.pt: not a finished run")
    if not p.exists():
        raise CheckpointError(f"{str(p)!r}: no such run directory or checkpoint file")
    return p, (p.parent if (p.parent / "config.yaml").is_file() else None)


def _meta_from_run(run: Path | None, where: str) -> dict[str, Any]:
    """Metadata for a checkpoint written before checkpoints carried it, from ``config.yaml``."""
    from ..config import load as load_config
    from ..engine.experiment import build_dataset, build_model, build_tasks
    from ..engine.metadata import describe

    if run is None:
        raise CheckpointError(
            f"{where} carries no model description (written before mtlcv stored one) and no "
            "run directory's config.yaml is beside it; pass the run directory instead"
        )
    try:
        cfg = load_config(run / "config.yaml")
        dataset = build_dataset(cfg, "val")
        tasks = build_tasks(cfg, dataset)
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg, tasks)
    except MtlcvError as exc:
        raise CheckpointError(
            f"{where} carries no model description and its run's config.yaml could not "
            f"rebuild it: {exc}"
        ) from None
    return describe(cfg, tasks, dataset, model)


def build_from_meta(meta: Mapping[str, Any], where: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild (untrained model, tasks) from checkpoint metadata; a one-line error if unknown."""
    from ..models.build import build_model
    from ..registry import TASKS

    spec = meta["model"]
    try:
        tasks = {}
        for name, t in meta["tasks"].items():
            task = TASKS.create(t["kind"], where=f"task {name!r}", **t.get("options", {}))
            task.name, task.kind, task.options = name, t["kind"], dict(t.get("options", {}))
            tasks[name] = task
        backbone = {k: v for k, v in spec["backbone"].items() if k not in INIT_ONLY["backbone"]}
        options = {k: v for k, v in spec["options"].items() if k not in INIT_ONLY["options"]}
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            model = build_model(spec["arch"], tasks, backbone, dict(spec["head"]), options)
    except MtlcvError as exc:
        written = meta.get("mtlcv_version", "?")
        raise CheckpointError(
            f"{where} (written by mtlcv {written}) cannot be rebuilt here: {exc}"
        ) from None
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: its model description is incomplete ({exc})") from None
    return model, tasks


def _load_state(model: torch.nn.Module, state: Mapping[str, Any], where: str) -> None:
    problems = state_problems(model.state_dict(), state, "checkpoint")
    if problems:
        raise CheckpointError(
            f"{where}: its weights do not fit the {type(model).__name__} its metadata "
            f"describes: {'; '.join(problems)}"
        )
    model.load_state_dict(state)


def load(path: str | os.PathLike, device: str = "auto") -> Predictor:
    """Load a trained model from a run directory (its ``best.pt``) or a checkpoint file.

    Args:
        path: a run directory or a ``.pt`` checkpoint written by the trainer.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        a :class:`Predictor`; ``predictor.predict(image)`` returns ``{task: tensor}``.

    Raises:
        CheckpointError: one line, when the path holds no checkpoint, the checkpoint is not
            mtlcv's, was written by a newer format, needs a component this mtlcv lacks, or its
            weights do not fit the model it describes.
    """
    from ..engine.checkpoint import load_checkpoint

    file, run = find_checkpoint(path)
    where = f"checkpoint {str(file)!r}"
    ckpt = load_checkpoint(file, map_location="cpu")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), Mapping):
        raise CheckpointError(f"{where} is not an mtlcv training checkpoint (no model weights)")
    meta = ckpt.get("meta")
    meta = check(meta if meta is not None else _meta_from_run(run, where), where)
    model, tasks = build_from_meta(meta, where)
    _load_state(model, ckpt["model"], where)
    return Predictor(model, tasks, meta, resolve_device(device), source=file)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return dev
