"""``mtlcv predict`` and ``mtlcv export``: the loops behind the two commands.

``predict`` reads the images in batches, predicts every task, hands each output to its task
kind's writer (:mod:`.writers`) and writes ``OUT/predictions.json`` (the checkpoint, every image
with its size and files, the failures, the times). A file that cannot be read is named on
stderr and skipped; the others are still processed and the exit code is 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .images import find_images, read_image
from .predictor import Predictor
from .writers import Target, writer_for


def output_stems(files: Sequence[Path]) -> list[str]:
    """One output name per input: its stem, with ``_2``, ``_3``... for repeated stems."""
    seen: dict[str, int] = {}
    stems = []
    for f in files:
        n = seen.get(f.stem, 0) + 1
        seen[f.stem] = n
        stems.append(f.stem if n == 1 else f"{f.stem}_{n}")
    return stems


def _progress(total: int, enabled: bool) -> Any:
    if not (enabled and sys.stdout.isatty()):
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    bar.start()
    bar.add_task("predict", total=total)
    return bar


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str],
    out: str | Path,
    *,
    batch_size: int = 8,
    fit: str = "resize",
    progress: bool = True,
    warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """Predict on every image named by ``inputs``; write the outputs under ``out``.

    Returns the summary written to ``out/predictions.json``: ``images`` (one record per image
    predicted), ``failed`` (``[{"file", "error"}]``), ``seconds`` (all of it, reading and writing
    included), ``model_seconds`` (resizing and the forward passes) and ``images_per_second``.
    """
    files = find_images(inputs)  # a DataError (exit 2) when nothing is named
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file; expected a folder for the outputs")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shared = []
    for name, task in predictor.tasks.items():
        shared += writer_for(task.kind).begin(out, name, task, predictor.class_names.get(name))
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    model_time = 0.0
    bar = _progress(len(files), progress)
    try:
        stems = output_stems(files)
        for i in range(0, len(files), batch_size):
            chunk = []
            for f, stem in zip(files[i : i + batch_size], stems[i : i + batch_size]):
                try:
                    chunk.append((f, stem, read_image(f)))
                except DataError as exc:
                    failed.append({"file": str(f), "error": str(exc)})
                    warn(f"mtlcv: skipped {exc}")
            if chunk:
                t0 = time.perf_counter()
                preds = predictor.predict_raw(
                    [c[2] for c in chunk], fit=fit, batch_size=batch_size
                )
                model_time += time.perf_counter() - t0
                for (f, stem, image), (raw, place) in zip(chunk, preds):
                    outputs = {}
                    for name, task in predictor.tasks.items():
                        target = Target(out, name, stem, predictor.class_names.get(name))
                        outputs[name] = writer_for(task.kind).write(
                            target, task, raw[name], image, place
                        )
                    records.append(
                        {"file": str(f), "size": list(place.size), "outputs": outputs}
                    )
            if bar is not None:
                bar.advance(bar.task_ids[0], len(files[i : i + batch_size]))
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - start
    summary = {
        "checkpoint": str(predictor.source) if predictor.source else None,
        "arch": predictor.meta["model"]["arch"],
        "tasks": {n: t.kind for n, t in predictor.tasks.items()},
        "input_size": list(predictor.input_size) if predictor.input_size else None,
        "fit": fit,
        "device": str(predictor.device),
        "shared_files": shared,
        "images": records,
        "failed": failed,
        "seconds": round(seconds, 3),
        "model_seconds": round(model_time, 3),
        "images_per_second": round(len(records) / seconds, 2) if seconds > 0 else None,
    }
    (out / "predictions.json").write_text(json.dumps(summary, indent=1))
    return summary


def summary_line(summary: dict[str, Any], out: str | Path) -> str:
    """``predicted 28 images in 3.1 s (9.0 images/s; model 1.2 s) on cpu -> OUT``."""
    n, bad = len(summary["images"]), len(summary["failed"])
    rate = summary["images_per_second"]
    line = (
        f"predicted {n} image{'s' * (n != 1)} in {summary['seconds']:.2f} s "
        f"({rate if rate is not None else '-'} images/s; model {summary['model_seconds']:.2f} s) "
        f"on {summary['device']} -> {out}"
    )
    return line + (f"; {bad} file{'s' * (bad != 1)} skipped" if bad else "")
