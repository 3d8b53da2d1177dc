"""Joint augmentation of an image and all of its targets (sample dicts of the batch contract).

Every function takes and returns an unbatched sample: ``image`` ``[3,H,W]``, ``semseg``
``[H,W]``, ``depth`` ``[1,H,W]``, ``normals`` ``[3,H,W]`` (plus any other spatial target, treated
as labels). How an entry is resampled depends on its key:

* ``image``: bilinear;
* ``normals``: bilinear, then renormalised to unit length; a pixel stays missing (all zero)
  where the nearest source pixel is missing;
* ``depth`` and every other spatial entry (labels, edges): nearest, so no value is invented
  and the ignore/missing values survive.

The published NYUv2 protocol (mtan, Liu et al., CVPR 2019, ``RandomScaleCrop`` in
``create_dataset.py``; reused by CAGrad, Nash-MTL, FAMO) is :func:`augment`: a random scale
``s`` in {1, 1.2, 1.5}, a random ``(H/s, W/s)`` window resized back to ``H×W`` with depth divided
by ``s``, then a horizontal flip with probability 1/2 that negates the normals' x component.
Randomness comes from torch's RNG (an explicit ``generator`` or the global one), so runs are
reproducible under ``torch.manual_seed``.

A target that is not a map (detection boxes) moves itself: any entry with ``hflip(width)`` and
``crop_resize(top, left, height, width, size)`` methods (:class:`mtlcv.tasks.detection.Boxes`)
is mirrored, cropped and scaled with the image (boxes clipped to the window, empty ones
dropped), so this module never needs to know the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

SCALES = (1.0, 1.2, 1.5)


def hflip(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror every spatial entry left-right; surface normals also get their x component negated.

    Flipping twice is the identity.
    """
    out = {}
    width = sample["image"].shape[-1]
    for key, value in sample.items():
        if _moves_itself(value):
            value = value.hflip(width)
        elif isinstance(value, torch.Tensor) and value.dim() >= 2:
            value = value.flip(-1)
            if key == "normals":
                value = value.clone()
                value[0] = -value[0]
        out[key] = value
    return out


def _resample(key: str, value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize one spatial entry to ``size`` with the interpolation its key calls for."""
    x = value.reshape(-1, *value.shape[-2:])[None]  # [1, C, h, w]
    if key in ("image", "normals"):
        # align_corners=True as in mtan's RandomScaleCrop
        y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True)
        if key == "normals":
            # sums of squares: the CPU vector norm over dim 1 is ~40x slower (tasks/normals.py)
            valid = F.interpolate(((x * x).sum(1, keepdim=True) > 0).float(), size=size) > 0
            norm = (y * y).sum(1, keepdim=True).sqrt()
            # zero (missing) neighbours only shorten the blend; renormalising restores unit length
            y = torch.where(valid & (norm > 1e-6), y / norm.clamp(min=1e-6), torch.zeros_like(y))
        y = y.to(value.dtype)
    else:
        # float64 holds every label id and depth value exactly; nearest copies source values
        y = F.interpolate(x.double(), size=size, mode="nearest").to(value.dtype)
    return y[0].reshape(*value.shape[:-2], *size)


def _spatial(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2


def _moves_itself(value: Any) -> bool:
    return hasattr(value, "crop_resize") and hasattr(value, "hflip")


def resize(sample: dict[str, Any], size: Sequence[int]) -> dict[str, Any]:
    """Resize every spatial entry to ``size = (H, W)`` (depth values unchanged: the view is)."""
    size = (int(size[0]), int(size[1]))
    h, w = sample["image"].shape[-2:]
    out = {}
    for k, v in sample.items():
        if _moves_itself(v):
            v = v.crop_resize(0, 0, h, w, size)
        elif _spatial(v):
            v = _resample(k, v, size)
        out[k] = v
    return out


def scale_crop(sample: dict[str, Any], scale: float, top: int, left: int) -> dict[str, Any]:
    """Crop the ``(int(H/scale), int(W/scale))`` window at ``(top, left)`` and resize it to H×W.

    Zooming by ``scale`` makes the scene look ``scale`` times closer, so depth is divided by
    ``scale``: an object of metric width w at depth d spans f·w/d pixels, and after the zoom it
    spans scale·f·w/d = f·w/(d/scale) pixels, i.e. it is seen as the same object at depth
    d/scale (mtan, Liu et al., CVPR 2019). Normals are unchanged.
    """
    h, w = sample["image"].shape[-2:]
    ch, cw = int(h / scale), int(w / scale)
    out = {}
    for key, value in sample.items():
        if _moves_itself(value):
            value = value.crop_resize(top, left, ch, cw, (h, w))
        elif _spatial(value):
            value = _resample(key, value[..., top : top + ch, left : left + cw], (h, w))
            if key == "depth":
                value = value / scale
        out[key] = value
    return out


def random_scale_crop(
    sample: dict[str, Any],
    scales: Sequence[float] = SCALES,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """mtan's ``RandomScaleCrop``: a scale drawn uniformly from ``scales``, a random window."""
    h, w = sample["image"].shape[-2:]
    scale = float(scales[int(torch.randint(len(scales), (1,), generator=generator))])
    ch, cw = int(h / scale), int(w / scale)
    top = int(torch.randint(h - ch + 1, (1,), generator=generator))
    left = int(torch.randint(w - cw + 1, (1,), generator=generator))
    return scale_crop(sample, scale, top, left)


def augment(
    sample: dict[str, Any],
    generator: torch.Generator | None = None,
    scales: Sequence[float] = SCALES,
    flip: float = 0.5,
) -> dict[str, Any]:
    """The published NYUv2 training augmentation, applied jointly to the image and all targets:
    :func:`random_scale_crop`, then :func:`hflip` with probability ``flip`` (mtan, CVPR 2019).
    """
    sample = random_scale_crop(sample, scales, generator)
    if float(torch.rand((), generator=generator)) < flip:
        sample = hflip(sample)
    return sample
