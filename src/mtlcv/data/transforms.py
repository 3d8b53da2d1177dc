"""Joint augmentation of an image and all of its targets (sample dicts of the batch contract)."""

from __future__ import annotations

from typing import Any

import torch


def hflip(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror every spatial entry left-right; surface normals also get their x component negated.

    Flipping twice is the identity.
    """
    out = {}
    for key, value in sample.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            value = value.flip(-1)
            if key == "normals":
                value = value.clone()
                value[0] = -value[0]
        out[key] = value
    return out
