"""NYUv2 camera intrinsics and surface normals derived from a depth map.

Normals from depth follow the usual recipe (e.g. Silberman et al., ECCV 2012; the fixture's
PROVENANCE.md): smooth the depth (Gaussian, missing pixels excluded), back-project every pixel
with the colour camera's intrinsics, take the cross product of the central-difference tangents
along x and y, and orient the result towards the camera. The frame is the batch contract's
(x right, y down, z forward), so a fronto-parallel wall gets ``(0, 0, -1)``.

Derived normals are NOT the ground truth of the published tables (those use the normals of
Ladicky et al., ECCV 2014 / Eigen & Fergus, ICCV 2015); datasets using them say so with
``normals_source = "derived"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics (pixels) of an image of ``width × height``."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def scaled(self, height: int, width: int) -> Intrinsics:
        """The same camera for the image resized to ``height × width`` (pixel centres kept)."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(
            self.fx * sx,
            self.fy * sy,
            (self.cx + 0.5) * sx - 0.5,
            (self.cy + 0.5) * sy - 0.5,
            width,
            height,
        )


#: NYUv2 colour camera at 640×480 (the toolbox's ``camera_params.m``: fx_rgb, fy_rgb, cx_rgb,
#: cy_rgb; Silberman et al., ECCV 2012).
NYU_INTRINSICS = Intrinsics(518.8579, 519.4696, 325.5824, 253.7362, 640, 480)


def _smooth(depth: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``depth [H, W]`` over valid (> 0) pixels only (normalised convolution)."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(depth.dtype)
    valid = (depth > 0).to(depth.dtype)
    stack = torch.stack([depth * valid, valid])[:, None]  # [2, 1, H, W]
    stack = F.conv2d(F.pad(stack, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    stack = F.conv2d(F.pad(stack, (0, 0, r, r)), k.view(1, 1, -1, 1))
    num, den = stack[0, 0], stack[1, 0]
    return torch.where(depth > 0, num / den.clamp(min=1e-12), torch.zeros_like(depth))


def normals_from_depth(
    depth: torch.Tensor, intrinsics: Intrinsics = NYU_INTRINSICS, sigma: float | None = None
) -> torch.Tensor:
    """Unit normals ``[3, H, W]`` from metric depth ``[H, W]`` or ``[1, H, W]`` (0 = missing).

    ``intrinsics`` are rescaled to the depth's resolution when they were given for another one.
    ``sigma`` is the smoothing in pixels (default: 4 px at 640 wide, scaled with the width).
    A pixel gets a normal when it and its four neighbours have depth; otherwise all zero.
    """
    d = depth.reshape(depth.shape[-2:]).double()
    h, w = d.shape
    k = intrinsics if (intrinsics.height, intrinsics.width) == (h, w) else intrinsics.scaled(h, w)
    sigma = 4.0 * w / 640 if sigma is None else sigma
    z = _smooth(d, sigma) if sigma > 0 else d
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    p = torch.stack([(u - k.cx) * z / k.fx, (v - k.cy) * z / k.fy, z])  # [3, H, W]
    # central differences; replicate padding makes them one-sided at the border
    pp = F.pad(p[None], (1, 1, 1, 1), mode="replicate")[0]
    du = pp[:, 1:-1, 2:] - pp[:, 1:-1, :-2]
    dv = pp[:, 2:, 1:-1] - pp[:, :-2, 1:-1]
    n = torch.linalg.cross(du, dv, dim=0)
    n = torch.where((n * p).sum(0, keepdim=True) > 0, -n, n)  # face the camera
    valid = F.pad((d > 0)[None, None].double(), (1, 1, 1, 1), mode="replicate")[0, 0] > 0
    valid = (
        valid[1:-1, 1:-1] & valid[1:-1, 2:] & valid[1:-1, :-2] & valid[2:, 1:-1] & valid[:-2, 1:-1]
    )
    norm = n.norm(dim=0, keepdim=True)
    valid = valid & (norm[0] > 0)
    n = torch.where(valid, n / norm.clamp(min=1e-300), torch.zeros_like(n))
    return n.to(depth.dtype if depth.dtype.is_floating_point else torch.float32)
