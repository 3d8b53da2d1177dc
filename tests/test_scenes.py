"""The procedural scenes dataset: determinism, ground truth checked against the geometry,
the cache and the dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtlcv.data import scenes as S
from mtlcv.data.scenes_render import (
    BED,
    CEILING,
    CLASSES,
    CLS,
    FLOOR,
    WALL,
    render_batch,
    sample_scene,
)
from mtlcv.errors import ConfigError, DataError
from mtlcv.registry import DATASETS

SIZE = (48, 64)


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    return S.render(12, size=SIZE, seed=3, return_meta=True)


def rays(k: np.ndarray, h: int, w: int) -> np.ndarray:
    """Camera-frame ray through every pixel centre, with z = 1: [H, W, 3]."""
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    return np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)


def to_world(batch: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    """World-frame hit points and normals of image ``i``: [H, W, 3] each."""
    h, w = batch["depth"].shape[2:]
    pc = rays(batch["K"], h, w) * batch["depth"][i, 0, ..., None]
    rot = batch["rotation"][i].astype(np.float64)
    pw = pc @ rot.T + batch["camera"][i]
    nw = batch["normals"][i].transpose(1, 2, 0) @ rot.T
    return pw, nw


def test_same_seed_same_bits_other_seed_other_images(batch):
    again = S.render(12, size=SIZE, seed=3)
    for key in again:
        assert np.array_equal(again[key], batch[key]), key
    other = S.render(2, size=SIZE, seed=4)
    assert not np.array_equal(other["image"], batch["image"][:2])
    assert not np.array_equal(other["depth"], batch["depth"][:2])


def test_an_image_does_not_depend_on_its_batch(batch):
    part = S.render(2, size=SIZE, seed=3, start=5)
    start, stop = (int(v) for v in np.cumsum(batch["box_count"])[[4, 6]])
    for key in part:
        want = batch[key][start:stop] if key in S.BOX_KEYS[:3] else batch[key][5:7]
        assert np.array_equal(part[key], want), key


def test_shapes_dtypes_ranges(batch):
    n, (h, w) = 12, SIZE
    expect = {"image": ((n, 3, h, w), np.uint8), "semseg": ((n, h, w), np.uint8),
              "depth": ((n, 1, h, w), np.float32), "normals": ((n, 3, h, w), np.float32),
              "edges": ((n, 1, h, w), np.float32), "classification": ((n,), np.int64)}
    for key, (shape, dtype) in expect.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert batch["semseg"].max() < len(CLASSES)
    assert 0.05 < batch["depth"].min() and batch["depth"].max() < 12
    assert set(np.unique(batch["edges"])) <= {0.0, 1.0}
    assert set(batch["classification"]) <= {0, 1, 2, 3}
    assert batch["image"].std() > 20  # textured and shaded, not flat


def test_normals_are_unit_and_face_the_camera(batch):
    n = batch["normals"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1, atol=1e-5)
    assert ((n * rays(batch["K"], *SIZE)).sum(-1) < 0).all()


def test_normals_derived_from_depth_agree_on_planar_regions(batch):
    """Back-project the depth map with the intrinsics, take the cross product of central
    differences, and compare with the rendered normals where the 3x3 neighbourhood is one
    planar face."""
    h, w = SIZE
    angles = []
    for i in range(len(batch["depth"])):
        p = rays(batch["K"], h, w) * batch["depth"][i, 0, ..., None].astype(np.float64)
        nd = np.cross(p[1:-1, 2:] - p[1:-1, :-2], p[2:, 1:-1] - p[:-2, 1:-1])
        nd /= np.linalg.norm(nd, axis=-1, keepdims=True)
        nd *= -np.sign((nd * p[1:-1, 1:-1]).sum(-1, keepdims=True))  # towards the camera
        surf = batch["surface"][i]
        same = np.ones((h - 2, w - 2), bool)
        for dy in range(3):
            for dx in range(3):
                same &= surf[dy:dy + h - 2, dx:dx + w - 2] == surf[1:-1, 1:-1]
        mask = same & batch["planar"][i, 1:-1, 1:-1]
        nr = batch["normals"][i].transpose(1, 2, 0)[1:-1, 1:-1]
        cos = np.clip((nd * nr).sum(-1)[mask], -1, 1)
        angles.append(np.degrees(np.arccos(cos)))
    angles = np.concatenate(angles)
    assert len(angles) > 0.5 * 12 * h * w
    assert np.median(angles) < 0.5 and np.percentile(angles, 99) < 3


def test_labels_agree_with_the_geometry_in_the_world_frame(batch):
    def close(a: np.ndarray, b, atol: float) -> bool:
        return np.abs(a - np.asarray(b)).max(initial=0) < atol

    seen = np.zeros(3, int)
    for i in range(len(batch["depth"])):
        pw, nw = to_world(batch, i)
        sem, room = batch["semseg"][i], batch["room"][i]
        floor, ceiling, wall = sem == FLOOR, sem == CEILING, sem == WALL
        seen += [floor.sum(), ceiling.sum(), wall.sum()]
        # the floor is the plane y = 0 and its normal points up (against gravity)
        assert close(nw[floor], [0, 1, 0], 1e-5) and close(pw[floor][:, 1], 0, 2e-4)
        assert close(nw[ceiling], [0, -1, 0], 1e-5) and close(pw[ceiling][:, 1], room[1], 2e-4)
        # walls are vertical and every wall pixel lies on one of the four wall planes
        assert close(nw[wall][:, 1], 0, 1e-5)
        pww = pw[wall]
        off = np.stack([pww[:, 0], room[0] - pww[:, 0], pww[:, 2], room[2] - pww[:, 2]], 1)
        assert np.abs(off).min(1).max(initial=0) < 2e-4
    assert (seen > 100).all(), seen


def test_edges_mark_instance_changes(batch):
    inst = batch["instance"]
    e = np.zeros(inst.shape, bool)
    e[:, :, 1:] |= inst[:, :, 1:] != inst[:, :, :-1]
    e[:, :, :-1] |= inst[:, :, 1:] != inst[:, :, :-1]
    e[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    e[:, :-1] |= inst[:, 1:] != inst[:, :-1]
    assert np.array_equal(batch["edges"][:, 0] == 1, e)
    # a change of class is a change of instance
    sem = batch["semseg"]
    assert e[:, :, 1:][sem[:, :, 1:] != sem[:, :, :-1]].all()


def test_tile_culling_never_changes_a_pixel():
    scenes = [sample_scene(np.random.default_rng([7, i])) for i in range(4)]
    a = render_batch(scenes, 40, 52, cull=True)
    b = render_batch(scenes, 40, 52, cull=False)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_classes_cover_most_of_nyuv2_13():
    sem = S.render(64, size=SIZE, seed=11)["semseg"]
    present = np.unique(sem)
    assert len(present) >= 11, [CLASSES[c] for c in present]
    freq = np.bincount(sem.ravel(), minlength=13) / sem.size
    assert freq[WALL] < 0.6  # not a wall classifier


def test_room_type_decides_the_furniture():
    has_bed = {0: [], 1: []}
    for i in range(80):
        s = sample_scene(np.random.default_rng([0, i]))
        has_bed[int(s.room_type == 0)].append(BED in s.prims[:, CLS])
    assert np.mean(has_bed[1]) > 0.9 and not any(has_bed[0])


# ----------------------------------------------------------------------------- cache & dataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("scenes-cache")
    S.write_cache(root, n=10, size=(24, 32), seed=5, progress=False)
    return root, S.render(10, size=(24, 32), seed=5)


def test_cache_round_trip(cache):
    root, ref = cache
    meta = json.loads((root / "meta.json").read_text())
    assert meta["n"] == 10 and meta["size"] == [24, 32] and meta["seed"] == 5
    assert meta["splits"] == {"train": 8, "val": 1, "test": 1}
    offset = {"train": 0, "val": 8, "test": 9}
    for split, start in offset.items():
        ds = S.ScenesDataset(root, split)
        assert len(ds) == meta["splits"][split]
        for i in range(len(ds)):
            item, j = ds[i], start + i
            assert item["image"].dtype == torch.float32 and item["semseg"].dtype == torch.int64
            assert torch.equal(item["image"], torch.from_numpy(ref["image"][j]).float() / 255)
            assert np.array_equal(item["semseg"].numpy(), ref["semseg"][j])
            assert np.array_equal(item["depth"].numpy(), ref["depth"][j])
            assert np.array_equal(item["normals"].numpy(), ref["normals"][j])
            assert np.array_equal(item["edges"].numpy(), ref["edges"][j])
            assert item["classification"].dtype == torch.int64
            assert item["classification"].dim() == 0
            assert int(item["classification"]) == ref["classification"][j]


def test_augment_flips_image_and_negates_normals_x(cache):
    root, _ = cache
    plain, aug = S.ScenesDataset(root, "train"), S.ScenesDataset(root, "train", augment=True)
    flips = 0
    for seed in range(8):
        torch.manual_seed(seed)
        a = aug[3]
        torch.manual_seed(seed)
        assert torch.equal(aug[3]["image"], a["image"])  # torch's RNG decides
        p = plain[3]
        if torch.equal(a["image"], p["image"]):
            assert torch.equal(a["normals"], p["normals"])
            continue
        flips += 1
        assert torch.equal(a["image"], p["image"].flip(-1))
        assert torch.equal(a["semseg"], p["semseg"].flip(-1))
        assert torch.equal(a["depth"], p["depth"].flip(-1))
        assert torch.equal(a["normals"][0], -p["normals"][0].flip(-1))
        assert torch.equal(a["normals"][1:], p["normals"][1:].flip(-1))
    assert 0 < flips < 8


def test_corrupt_or_truncated_cache_file_is_a_data_error(tmp_path):
    S.write_cache(tmp_path, n=6, size=(16, 24), seed=0, progress=False)
    test = tmp_path / "test.npz"
    test.write_bytes(test.read_bytes()[:500])
    with pytest.raises(DataError, match="test.npz' is corrupt or truncated"):
        S.ScenesDataset(tmp_path, "test")
    val = tmp_path / "val.npz"
    raw = bytearray(val.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(255 - b for b in raw[middle:middle + 64])
    val.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="val.npz"):
        S.ScenesDataset(tmp_path, "val")
    S.ScenesDataset(tmp_path, "train")  # untouched


def test_interrupted_write_leaves_no_complete_looking_cache(tmp_path, monkeypatch):
    S.write_cache(tmp_path, n=6, size=(16, 24), seed=0, progress=False)
    calls, real = [], np.savez_compressed

    def savez(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, **arrays)

    monkeypatch.setattr(S.np, "savez_compressed", savez)
    with pytest.raises(KeyboardInterrupt):
        S.write_cache(tmp_path, n=6, size=(16, 24), seed=1, progress=False)
    assert not (tmp_path / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.npz", "train.npz", "val.npz"]
    with pytest.raises(DataError, match="no complete scenes cache"):  # nothing to read
        S.ScenesDataset(tmp_path, "train")


def test_factory_builds_a_missing_cache_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTLCV_CACHE", str(tmp_path))
    ds = DATASETS.create("scenes", split="val", n=5, size=[16, 24], seed=2)
    assert (tmp_path / "scenes-n5-16x24-s2" / "meta.json").is_file()
    assert "rendering 5 images" in capsys.readouterr().out
    assert len(ds) == 1 and ds[0]["image"].shape == (3, 16, 24)
    assert ds.targets == ("semseg", "depth", "normals", "edges", "classification", "detection")
    assert ds.task_options["semseg"] == {"num_classes": 13}
    assert ds.task_options["classification"] == {"num_classes": 4}
    DATASETS.create("scenes", split="test", n=5, size=[16, 24], seed=2)
    assert "rendering" not in capsys.readouterr().out


def test_factory_errors_name_what_is_wrong(cache):
    root, _ = cache
    with pytest.raises(ConfigError, match="unknown split 'dev'; valid: train, val, test"):
        S.scenes(split="dev", root=str(root), n=10, size=(24, 32), seed=5)
    with pytest.raises(DataError, match="holds n=10, size=24x32, seed=5 but n=12"):
        S.scenes(root=str(root), n=12, size=(24, 32), seed=5)
    with pytest.raises(ConfigError, match="'size'"):
        S.scenes(root=str(root), size="big")
    with pytest.raises(ConfigError, match="'n'"):
        S.write_cache(root, n=0)


def test_cache_round_trip_of_the_detection_boxes(cache):
    root, ref = cache
    ends = np.cumsum(ref["box_count"])
    offset = {"train": 0, "val": 8, "test": 9}
    for split, start in offset.items():
        ds = S.ScenesDataset(root, split)
        assert ds.task_options["detection"] == {"num_classes": len(S.DET_CLASSES)}
        for i in range(len(ds)):
            j = start + i
            boxes = ds[i]["detection"]
            lo, hi = ends[j] - ref["box_count"][j], ends[j]
            assert np.array_equal(boxes.boxes.numpy(), ref["boxes"][lo:hi])
            assert np.array_equal(boxes.labels.numpy(), ref["box_class"][lo:hi])
    assert ref["box_count"].sum() > 0
    assert set(ref["box_class"].tolist()) <= set(range(len(S.DET_CLASSES)))


def test_an_old_cache_format_is_re_rendered_or_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTLCV_CACHE", str(tmp_path))
    folder = tmp_path / "scenes-n5-16x24-s2"
    S.write_cache(folder, n=5, size=(16, 24), seed=2, progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(dict(meta, format=1)))
    with pytest.raises(DataError, match="has format 1, this version reads format 2; delete it"):
        S.scenes(root=str(folder), n=5, size=(16, 24), seed=2)  # a folder the user named
    ds = S.scenes(split="val", n=5, size=(16, 24), seed=2)  # the default cache is renewed
    assert "has format 1" in capsys.readouterr().out and len(ds[0]["detection"].boxes.shape) == 2
    assert json.loads((folder / "meta.json").read_text())["format"] == S.FORMAT


def test_data_check_validates_the_boxes_of_a_scenes_cache(tmp_path, capsys):
    from mtlcv.cli import main

    S.write_cache(tmp_path, n=8, size=(24, 32), seed=1, progress=False)
    assert main(["data", "check", str(tmp_path)]) == 0
    assert "OK (scenes cache, 8 images at 24×32" in capsys.readouterr().out
    with np.load(tmp_path / "train.npz") as z:
        arrays = dict(z)
    arrays["boxes"][0] = [10, 3, 4, 9]  # negative width
    arrays["box_class"][1] = 12  # no such class
    np.savez_compressed(tmp_path / "train.npz", **arrays)
    assert main(["data", "check", str(tmp_path)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert any("train.npz image 0: box 0 has negative width (x1 10, x2 4)" in line for line in out)
    assert any("has class 12, outside [0, 10)" in line for line in out)
    assert "2 problem(s) found (scenes cache" in out[-1]
def test_scenes_n_train_takes_a_prefix_of_the_training_split(scenes_root):
    opts = {"root": scenes_root, "n": 48, "size": [32, 48], "seed": 0}
    full = DATASETS.create("scenes", split="train", **opts)
    part = DATASETS.create("scenes", split="train", n_train=10, **opts)
    val = DATASETS.create("scenes", split="val", n_train=10, **opts)
    assert len(part) == 10 and torch.equal(part[3]["image"], full[3]["image"])
    for i in (0, 9):  # the boxes of a kept image are its own
        assert torch.equal(part[i]["detection"].boxes, full[i]["detection"].boxes)
    assert len(val) == len(DATASETS.create("scenes", split="val", **opts))  # unchanged
    with pytest.raises(ConfigError, match="n_train"):
        DATASETS.create("scenes", split="train", n_train=len(full) + 1, **opts)
