"""Named published baselines, so Δm can be computed against the literature as well as against a
user's own single-task runs.

Each baseline maps ``task -> metric -> value`` with the metric names of :mod:`mtlcv.tasks`
(percentages for ``miou``, ``pixel_acc``, ``delta1`` and ``within_*``; metres for depth errors;
degrees for angles). A baseline only has the metrics its paper reports: restrict a result to
them before :func:`~mtlcv.analysis.delta_m.delta_m` (e.g. ``nyuv2-segnet-stl`` has no depth
``rmse`` or ``delta1``).

* ``nyuv2-segnet-stl``: independent single-task SegNet models on NYUv2 (13 classes, 288×384,
  the mtan protocol), from B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient
  Descent for Multi-task Learning" (CAGrad), NeurIPS 2021, NYU-v2 results table, row
  "Independent"; the same row is the STL baseline of Nash-MTL (Navon et al., ICML 2022) and
  FAMO (Liu et al., NeurIPS 2023), whose Δm values are relative to it. The same nine numbers
  are the ``BASE`` array of Nash-MTL's official ``experiments/nyuv2/utils.py`` ("base results
  from CAGrad", as fractions). Measured under the papers' published protocol (depth and normals
  averaged over test batches of 2, mean of the last 10 epochs; see
  :mod:`mtlcv.engine.protocol`): Δm against it needs ``eval.protocol: published``.
* ``cityscapes-segnet-stl``: independent single-task SegNet models on Cityscapes (7 classes +
  depth, 128×256, the mtan protocol), from the same CAGrad paper's Cityscapes results table, row
  "Independent", also the STL row of Nash-MTL and the Δm base of FAMO's code
  (``experiments/cityscapes/utils.py``: 0.7401, 0.9316, 0.0125, 27.77). Depth errors are on the
  preprocessed release's own depth encoding; ``rel_err`` is the mean relative error as printed.

Every named baseline declares its evaluation protocol in :data:`PROTOCOLS`.
"""

from __future__ import annotations

import copy

from ..errors import ConfigError

BASELINES: dict[str, dict[str, dict[str, float]]] = {
    "nyuv2-segnet-stl": {
        "semseg": {"miou": 38.30, "pixel_acc": 63.76},
        "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
        "normals": {
            "mean": 25.01,
            "median": 19.21,
            "within_11.25": 30.14,
            "within_22.5": 57.20,
            "within_30": 69.15,
        },
    },
    "cityscapes-segnet-stl": {
        "semseg": {"miou": 74.01, "pixel_acc": 93.16},
        "depth": {"abs_err": 0.0125, "rel_err": 27.77},
    },
}


#: the evaluation protocol each named baseline was measured under (mtlcv.engine.protocol)
PROTOCOLS: dict[str, str] = {"nyuv2-segnet-stl": "published", "cityscapes-segnet-stl": "published"}


def baseline_protocol(name: str) -> str:
    """The evaluation protocol of the named baseline ``name`` (ConfigError if unknown)."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; valid: {', '.join(sorted(BASELINES))}")
    return PROTOCOLS[name]


def get_baseline(name: str) -> dict[str, dict[str, float]]:
    """A copy of the published baseline ``name`` (``task -> metric -> value``).

    Example:
        >>> get_baseline("nyuv2-segnet-stl")["semseg"]["miou"]
        38.3
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; valid: {', '.join(sorted(BASELINES))}")
    return copy.deepcopy(BASELINES[name])
