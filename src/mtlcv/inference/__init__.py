"""Use a trained model: load a run, predict on images, export (TorchScript, ONNX).

* :func:`load` (also ``mtlcv.load``): a run directory or checkpoint -> :class:`Predictor`;
* ``Predictor.predict(image_or_batch) -> {task: tensor}`` (detection: per image a dict of
  boxes in the image's pixels, scores and labels);
* :func:`export`: TorchScript or ONNX, one named output per task, dynamic batch, checked
  against PyTorch before the file is written;
* :mod:`.writers`: the per-task-kind output files of ``mtlcv predict``.
"""

from __future__ import annotations

from .export import ExportError, export
from .predictor import Placement, Predictor, load

__all__ = ["ExportError", "Placement", "Predictor", "export", "load"]
