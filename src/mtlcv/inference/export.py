"""Export a trained model for deployment: TorchScript or ONNX, verified against PyTorch.

The exported graph has one input, ``image``: float32 ``[batch, 3, H, W]``, RGB in [0, 1] at the
model's input size (the normalisation is inside the graph), and one output per task, named by
the task, holding its RAW head output (logits, metres, unnormalised normals: see
:attr:`mtlcv.inference.writers.Writer.raw_output`). The batch axis is dynamic; H and W are
fixed at export time. The checkpoint's metadata travels inside the file (TorchScript: the extra
file ``mtlcv.json``; ONNX: the metadata property ``mtlcv``).

A detection task's output is its raw head map ``[batch, classes + 5, H, W]``: decoding and
per-class NMS (a data-dependent loop) are not in the graph; the task's
:meth:`~mtlcv.tasks.detection.Detection.postprocess` decodes the output to boxes in the graph
input's pixels (``docs/inference.md``).

Every export is checked before the file is written: the exported graph runs a random batch of
a size other than the one it was traced with (so a batch size baked into the graph is caught)
and each output must match the PyTorch model within ``atol = rtol = 1e-4``; otherwise nothing
is written and the error names the task and the difference. A model that cannot be exported
(an operation the exporter lacks, a task whose prediction is not one tensor) is refused in one
line saying why.

ONNX: PyTorch 2.13 has two exporters. ``torch.onnx.export(..., dynamo=True)`` (the default
since PyTorch 2.9) goes through ``torch.export`` and needs the ``onnxscript`` package; the
TorchScript-based one (``dynamo=False``) is deprecated but still shipped. Both give outputs
within 1e-7 of PyTorch on every architecture here, but the dynamo exporter took 4 to 40 s per
tiny model against 0.2 to 5 s, so ``exporter="auto"`` uses the TorchScript-based one while
PyTorch has it and the dynamo one otherwise; ``exporter="dynamo"`` asks for it. ONNX needs
``pip install 'mtlcv[export]'`` (onnx, onnxruntime for the check, onnxscript).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MtlcvError
from .predictor import Predictor
from .writers import writer_for

FORMATS = ("torchscript", "onnx")
EXPORTERS = ("auto", "torchscript", "dynamo")
TOLERANCE = 1e-4
#: batch of the traced example and of the check (different, so a fixed batch is caught)
TRACE_BATCH, CHECK_BATCH = 2, 3
INSTALL = "pip install 'mtlcv[export]'"


class ExportError(MtlcvError):
    """A model cannot be exported, or its export does not reproduce it."""


class Graph(nn.Module):
    """The model with its outputs as a tuple in task order (what the exporters trace)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        return tuple(out[n] for n in self.names)


class NamedGraph(Graph):
    """The model with its outputs as ``{task: tensor}`` (TorchScript keeps the names)."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = self.model(image)
        return {n: out[n] for n in self.names}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracers' warnings and the ONNX exporters' logging for one export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_io(predictor: Predictor, size: tuple[int, int]) -> dict[str, Any]:
    """The exported graph's input and outputs, for the file's metadata and the CLI."""
    h, w = size
    outputs = {}
    for name, task in predictor.tasks.items():
        shape = ["batch", task.channels] + ([h, w] if task.dense else [])
        outputs[name] = {"kind": task.kind, "shape": shape, "is": writer_for(task.kind).raw_output}
    return {
        "input": {"name": "image", "shape": ["batch", 3, h, w], "dtype": "float32",
                  "is": "RGB in [0, 1]; normalised inside the graph"},
        "outputs": outputs,
    }  # fmt: skip


def _torchscript(graph: nn.Module, example: torch.Tensor, path: Path, meta: str) -> None:
    traced = torch.jit.trace(graph, example, strict=False, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={"mtlcv.json": meta})


def _onnx(
    graph: nn.Module, example: torch.Tensor, path: Path, names: list[str], exporter: str
) -> str:
    """Export to ``path``; returns the exporter used."""
    try:
        import onnx  # noqa: F401 - needed for the metadata below; fail before exporting
    except ImportError:
        raise ExportError(f"ONNX export needs the onnx package: {INSTALL}") from None
    dynamo = exporter == "dynamo"
    kwargs: dict[str, Any] = {"input_names": ["image"], "output_names": names}
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ExportError(
                f"the dynamo ONNX exporter needs the onnxscript package: {INSTALL}"
            ) from None
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        kwargs["verbose"] = False
        kwargs["external_data"] = False  # one file (the weights inside), like the other exporter
    else:
        kwargs["dynamic_axes"] = {"image": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    torch.onnx.export(graph, (example,), str(path), dynamo=dynamo, **kwargs)
    return "dynamo" if dynamo else "torchscript"


def _add_onnx_metadata(path: Path, meta: str) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "mtlcv", meta
    onnx.save(model, str(path))


def _run_exported(fmt: str, path: Path, x: torch.Tensor, names: list[str]) -> list | None:
    """Outputs of the exported file on ``x`` in task order; None when it cannot be run here."""
    if fmt == "torchscript":
        out = torch.jit.load(str(path), map_location="cpu")(x)
        return [out[n] for n in names]
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [o.name for o in session.get_outputs()]
    if got != names:
        raise ExportError(f"the ONNX graph's outputs are {got}, expected {names}")
    return [torch.from_numpy(a) for a in session.run(None, {"image": x.numpy()})]


def export(
    predictor: Predictor,
    fmt: str,
    out: str | os.PathLike,
    *,
    size: tuple[int, int] | None = None,
    exporter: str = "auto",
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Export ``predictor``'s model to ``out`` as ``fmt`` (``torchscript`` or ``onnx``).

    Args:
        predictor: a loaded model (:func:`mtlcv.load`); it is exported from a CPU copy.
        fmt: ``"torchscript"`` or ``"onnx"``.
        out: the file to write (replaced atomically, only after the check passed).
        size: ``(H, W)`` of the graph's input (default: the size the model was trained at).
        exporter: ONNX only: ``"auto"``, ``"torchscript"`` or ``"dynamo"`` (module docstring).
        tolerance: the check's ``atol`` and ``rtol``.

    Returns:
        ``{"file", "format", "exporter", "bytes", "input", "outputs", "verified",
        "max_abs_diff": {task: float}, "note"}``; ``verified`` is False (with a ``note``) only
        for ONNX without onnxruntime installed.

    Raises:
        ExportError: one line, when the model cannot be exported or the export differs.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"--onnx-exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    size = size or predictor.input_size
    if size is None:
        raise ExportError("the checkpoint does not record its input size; pass --size HxW")
    arch = predictor.meta["model"]["arch"]
    names = list(predictor.tasks)
    model = copy.deepcopy(predictor.model).cpu().eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(TRACE_BATCH, 3, *size, generator=gen)
    check = torch.rand(CHECK_BATCH, 3, *size, generator=gen)
    with torch.inference_mode():
        ref = model(check)
    for n in names:
        if not isinstance(ref.get(n), torch.Tensor):
            kind = predictor.tasks[n].kind
            raise ExportError(
                f"architecture {arch!r} cannot be exported to {fmt}: task {n!r} ({kind}) "
                f"predicts a {type(ref.get(n)).__name__}, not one tensor per batch"
            )
    info = describe_io(predictor, size)
    meta = json.dumps({**predictor.meta, "export": info})
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; expected the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    used = "torch.jit.trace"
    try:
        try:
            with _quiet():
                if fmt == "torchscript":
                    _torchscript(NamedGraph(model, names), example, tmp, meta)
                else:
                    want = exporter
                    if want == "auto":  # the TorchScript-based exporter while PyTorch has it
                        want = "torchscript" if _has_legacy_onnx() else "dynamo"
                    used = _onnx(Graph(model, names), example, tmp, names, want)
                    _add_onnx_metadata(tmp, meta)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - any exporter failure is one line
            raise ExportError(
                f"architecture {arch!r} cannot be exported to {fmt}: {_reason(exc)}"
            ) from None
        try:
            with _quiet():
                got = _run_exported(fmt, tmp, check, names)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ExportError(
                f"the {fmt} export of architecture {arch!r} does not run: {_reason(exc)}"
            ) from None
        diffs: dict[str, float] = {}
        if got is not None:
            for n, a in zip(names, got):
                b = ref[n].float()
                if tuple(a.shape) != tuple(b.shape):
                    raise ExportError(
                        f"the {fmt} export of {arch!r} gives task {n!r} the shape "
                        f"{list(a.shape)} for a batch of {CHECK_BATCH}, expected {list(b.shape)}"
                    )
                diff = (a.detach().float() - b.detach()).abs()
                diffs[n] = float(diff.max()) if diff.numel() else 0.0
                if not torch.all(diff <= tolerance + tolerance * b.abs()):
                    raise ExportError(
                        f"the {fmt} export of {arch!r} differs from the PyTorch model on task "
                        f"{n!r} by up to {diffs[n]:.3g} (tolerance {tolerance:g}); not written"
                    )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "file": str(out),
        "format": fmt,
        "exporter": used,
        "bytes": out.stat().st_size,
        **info,
        "verified": got is not None,
        "check_batch": CHECK_BATCH,
        "max_abs_diff": diffs,
        "note": "" if got is not None else f"not checked: onnxruntime is not installed ({INSTALL})",
    }


def _has_legacy_onnx() -> bool:
    """True while PyTorch still ships the TorchScript-based ONNX exporter."""
    try:
        from torch.onnx import utils

        return hasattr(utils, "export")
    except ImportError:  # pragma: no cover - a future PyTorch
        return False
