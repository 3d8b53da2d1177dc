"""Joint augmentation: flips and scale crops agree with direct NumPy resampling, keep depth
metrically consistent, keep label/normal values legal, and are reproducible under a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlcv.data.transforms import augment, hflip, random_scale_crop, resize, scale_crop

H, W = 24, 32


def make_sample(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random image, labels (with ignore), depth (with holes) and unit normals (with holes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 13, (H, W), generator=g)
    labels[torch.rand(H, W, generator=g) < 0.1] = 255
    depth = 0.5 + 9 * torch.rand(1, H, W, generator=g)
    depth[:, torch.rand(H, W, generator=g) < 0.1] = 0
    normals = torch.nn.functional.normalize(torch.randn(3, H, W, generator=g), dim=0)
    normals[:, 3:7, 5:12] = 0
    return {"image": torch.rand(3, H, W, generator=g), "semseg": labels, "depth": depth,
            "normals": normals}  # fmt: skip


def nearest_rows(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index for PyTorch's 'nearest' (floor(dst · in / out))."""
    return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(int), n_in - 1)


def bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``a [C, h, w]`` with align_corners=True, written out in NumPy."""
    _, h, w = a.shape
    ys = np.arange(size[0]) * ((h - 1) / (size[0] - 1))
    xs = np.arange(size[1]) * ((w - 1) / (size[1] - 1))
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = a[:, y0][:, :, x0] * (1 - fx) + a[:, y0][:, :, x1] * fx
    bot = a[:, y1][:, :, x0] * (1 - fx) + a[:, y1][:, :, x1] * fx
    return top * (1 - fy) + bot * fy


def test_two_flips_are_the_identity_and_one_negates_normal_x():
    s = make_sample()
    f = hflip(s)
    assert torch.equal(f["semseg"], s["semseg"].flip(-1))
    assert torch.equal(f["normals"][0], -s["normals"][0].flip(-1))
    assert torch.equal(f["normals"][1:], s["normals"][1:].flip(-1))
    ff = hflip(f)
    for k in s:
        assert torch.equal(ff[k], s[k]), k


def test_scale_one_is_the_identity():
    s = make_sample()
    for out in (scale_crop(s, 1.0, 0, 0), random_scale_crop(s, scales=(1.0,))):
        for k in s:
            assert out[k].dtype == s[k].dtype and out[k].shape == s[k].shape
            torch.testing.assert_close(out[k], s[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale,top,left", [(1.2, 3, 5), (1.5, 8, 0), (1.5, 0, 10)])
def test_scale_crop_matches_direct_numpy_resampling(scale, top, left):
    s = make_sample(1)
    out = scale_crop(s, scale, top, left)
    ch, cw = int(H / scale), int(W / scale)
    rows, cols = nearest_rows(ch, H) + top, nearest_rows(cw, W) + left
    np.testing.assert_array_equal(out["semseg"].numpy(), s["semseg"].numpy()[rows][:, cols])
    np.testing.assert_allclose(
        out["depth"].numpy(), s["depth"].numpy()[:, rows][:, :, cols] / scale, rtol=1e-6
    )
    crop = s["image"].numpy()[:, top : top + ch, left : left + cw]
    np.testing.assert_allclose(out["image"].numpy(), bilinear(crop, (H, W)), atol=1e-5)
    # normals: bilinear then renormalised; zero exactly where the nearest source is missing
    n = bilinear(s["normals"].numpy()[:, top : top + ch, left : left + cw].astype(np.float64),
                 (H, W))  # fmt: skip
    missing = (s["normals"].numpy()[:, rows][:, :, cols] == 0).all(0)
    want = np.where(missing, 0.0, n / np.linalg.norm(n, axis=0).clip(1e-12))
    np.testing.assert_allclose(out["normals"].numpy(), want, atol=1e-4)  # float32 blend


def test_random_scale_crop_keeps_label_set_and_unit_or_zero_normals():
    s = make_sample(2)
    torch.manual_seed(0)
    for _ in range(20):
        out = augment(s)
        assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
        norm = out["normals"].norm(dim=0)
        assert ((norm - 1).abs() < 1e-5).logical_or(norm == 0).all()
        assert out["depth"].min() >= 0
        assert out["semseg"].dtype == torch.long and out["image"].shape == (3, H, W)


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_scale_keeps_depth_metrically_consistent(scale):
    """A fronto-parallel plane at depth d holding a square of metric width w: after a zoom by
    ``scale`` the plane is at d/scale and the square spans ``scale`` times more pixels, so the
    back-projected width (pixels · depth / f) is unchanged."""
    h, w, d, f = 120, 160, 3.0, 100.0
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[40:80, 60:100] = 5  # 40 px wide square at the centre
    wall = torch.tensor([0.0, 0.0, -1.0]).view(3, 1, 1).expand(3, h, w).clone()
    s = {"image": torch.rand(3, h, w), "semseg": labels, "depth": torch.full((1, h, w), d),
         "normals": wall}  # fmt: skip
    ch, cw = int(h / scale), int(w / scale)
    out = scale_crop(s, scale, (h - ch) // 2, (w - cw) // 2)
    torch.testing.assert_close(out["depth"], torch.full((1, h, w), d / scale))
    px = (out["semseg"] == 5).any(0).sum().item()
    assert abs(px - 40 * scale) <= 2
    assert abs(px * (d / scale) / f - 40 * d / f) <= 2 * d / f  # same metric width
    torch.testing.assert_close(out["normals"], s["normals"])  # a plane keeps its normal


def test_augment_is_reproducible_under_a_seed_and_explores_all_choices():
    s = make_sample(3)
    torch.manual_seed(7)
    a = augment(s)
    torch.manual_seed(7)
    b = augment(s)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c, d = augment(s, generator=g1), augment(s, generator=g2)
    for k in s:
        assert torch.equal(a[k], b[k]) and torch.equal(c[k], d[k])
    # the three scales and both flip states all occur
    g = torch.Generator().manual_seed(0)
    ramp = {"image": torch.arange(W, dtype=torch.float32).expand(3, H, W).clone()}
    seen = set()
    for _ in range(60):
        img = augment(ramp, generator=g)["image"][0, 0]
        span = round(float((img[-1] - img[0]).abs()), 3)  # (W - 1) / scale-ish
        seen.add((span, bool(img[-1] > img[0])))
    assert len({s for s, _ in seen}) == 3 and {f for _, f in seen} == {True, False}


def test_resize_keeps_depth_values_and_label_ids():
    s = make_sample(4)
    out = resize(s, (12, 16))
    assert out["image"].shape == (3, 12, 16) and out["semseg"].shape == (12, 16)
    np.testing.assert_array_equal(
        out["depth"].numpy(), s["depth"].numpy()[:, nearest_rows(H, 12)][:, :, nearest_rows(W, 16)]
    )
    assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
