"""NYUv2 loaders on real frames (the shared fixture), round trips through layouts (a) and (b)
written under tmp_path, metrics of simple predictors against direct NumPy computations, and
one-line errors for every kind of bad input.

Nothing derived from the fixture is written outside pytest's tmp_path.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtlcv.data.check import check_dataset, main_check
from mtlcv.data.nyuv2 import NYU_INTRINSICS, Intrinsics, load_mapping, normals_from_depth
from mtlcv.data.nyuv2.matfile import read_mat
from mtlcv.errors import ConfigError, DataError
from mtlcv.registry import DATASETS
from mtlcv.tasks import create

FIXTURE = Path(__file__).resolve().parents[2] / "shared/data/nyuv2-fixture"
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "nyuv2_mini_real.npz").is_file(),
    reason=f"real NYUv2 fixture not found at {FIXTURE} (shared/data is not checked out here)",
)
TARGETS = ("semseg", "depth", "normals")


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    if not (FIXTURE / "nyuv2_mini_real.npz").is_file():
        pytest.skip(f"real NYUv2 fixture not found at {FIXTURE}")
    with np.load(FIXTURE / "nyuv2_mini_real.npz") as z:
        return {k: z[k] for k in z.files}


def fixture_ds(split: str, **kw):
    return DATASETS.create("nyuv2-fixture", split=split, root=str(FIXTURE), **kw)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (deg) between unit vectors along the last axis."""
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


# ---------------------------------------------------------------- (c) the fixture itself


@needs_fixture
def test_fixture_splits_shapes_ids_and_ranges(fx):
    train, test = fixture_ds("train"), fixture_ds("test")
    assert len(train) == (fx["split"] == 0).sum() == 10
    assert len(test) == (fx["split"] == 1).sum() == 18
    assert len(fixture_ds("val")) == 18  # the published protocol scores on the test frames
    assert train.task_options == {"semseg": {"num_classes": 13}}
    assert train.targets == TARGETS and train.normals_source == "ground truth"
    for ds in (train, test):
        np.testing.assert_array_equal(ds.has["depth"], fx["has_depth"][ds.ids])
        np.testing.assert_array_equal(ds.has["semseg"], fx["has_seg"][ds.ids])
        for i in range(len(ds)):
            s, k = ds[i], int(ds.ids[i])
            assert s["image"].shape == (3, 240, 320) and s["image"].dtype == torch.float32
            np.testing.assert_array_equal(
                s["image"].numpy(), fx["rgb"][k].transpose(2, 0, 1).astype(np.float32) / 255
            )
            ids = set(np.unique(s["semseg"].numpy()).tolist())
            assert s["semseg"].dtype == torch.int64 and ids <= set(range(13)) | {255}
            if ds.has["semseg"][i]:
                assert len(ids - {255}) >= 2
                np.testing.assert_array_equal(s["semseg"].numpy(), fx["seg13"][k])
            else:
                assert ids == {255}
            d = s["depth"]
            assert d.shape == (1, 240, 320)
            if ds.has["depth"][i]:
                assert 0.7 < d[d > 0].min() and d.max() < 10.0  # metres, README: 0.77..9.95
                assert (d > 0).float().mean() > 0.9
            else:
                assert (d == 0).all()
            n = s["normals"].norm(dim=0)
            assert ((n - 1).abs() < 1e-5).logical_or(n == 0).all()
            assert bool((n > 0).any()) == bool(ds.has["normals"][i])


@needs_fixture
def test_fixture_batches_meet_the_task_contract(fx):
    ds = fixture_ds("test", augment=True)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    for t in TARGETS:
        create(t, **ds.task_options.get(t, {})).check_target(batch[t], batch["image"])
    forty = fixture_ds("test", num_classes=40)
    assert forty.task_options == {"semseg": {"num_classes": 40}}
    np.testing.assert_array_equal(forty[0]["semseg"].numpy(), fx["seg40"][forty.ids[0]])


# ---------------------------------------------------------------- normals from depth


def test_derived_normals_of_planes_are_exact():
    """Depth of the plane n·P = c under a pinhole camera, Z = c / (n · K⁻¹(u, v, 1))."""
    k = Intrinsics(60.0, 62.0, 31.3, 23.7, 64, 48)
    v, u = np.mgrid[0:48, 0:64].astype(np.float64)
    for n in ([0.0, 0.0, -1.0], [0.3, -0.2, -0.93], [-0.6, 0.1, -0.79]):
        n = np.array(n) / np.linalg.norm(n)
        rays = np.stack([(u - k.cx) / k.fx, (v - k.cy) / k.fy, np.ones_like(u)], -1)
        depth = -2.0 / (rays @ n)  # c = -2: the plane faces the camera
        # unsmoothed: back-projected neighbours lie in the plane, so the normal is exact
        got = normals_from_depth(torch.from_numpy(depth), k, sigma=0).permute(1, 2, 0).numpy()
        assert angles(got, n).max() < 1e-4
        # smoothing blurs 1/(linear) depth: a tiny bias only
        got = normals_from_depth(torch.from_numpy(depth), k).permute(1, 2, 0).numpy()
        assert angles(got[3:-3, 3:-3], n).max() < 0.01
    hole = torch.full((48, 64), 2.0)
    hole[10:20, 10:20] = 0
    got = normals_from_depth(hole, k)
    assert (got[:, 9:21, 9:21][:, 1:-1, 1:-1] == 0).all()  # no normal where depth is missing
    torch.testing.assert_close(got[:, 30, 40], torch.tensor([0.0, 0.0, -1.0]))


@needs_fixture
def test_frame3_ground_truth_normals_agree_with_derived_normals(fx):
    k = int(np.flatnonzero(fx["index"] == 3)[0])
    assert fx["has_normal"][k]
    derived = normals_from_depth(torch.from_numpy(fx["depth"][k].astype(np.float32)))
    assert torch.equal(  # intrinsics default to NYUv2's, rescaled to 240×320
        derived, normals_from_depth(torch.from_numpy(fx["depth"][k].astype(np.float32)),
                                    NYU_INTRINSICS.scaled(240, 320))
    )  # fmt: skip
    gt = fx["normal"][k].astype(np.float64)
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True).clip(1e-12)
    mine = derived.permute(1, 2, 0).numpy().astype(np.float64)
    valid = (np.abs(gt).sum(-1) > 0) & (np.abs(mine).sum(-1) > 0)
    assert valid.mean() > 0.9
    ang = angles(mine[valid], gt[valid])
    assert np.median(ang) < 15.0
    # the task metric (exact median over the split) agrees with the direct computation
    metric = create("normals").new_metric()
    target = torch.from_numpy(np.where(valid[..., None], gt, 0.0)).permute(2, 0, 1)[None].float()
    metric.update(derived[None], target)
    m = metric.compute()
    assert m["median"] == pytest.approx(np.median(ang), abs=1e-3)
    assert m["mean"] == pytest.approx(ang.mean(), abs=1e-3)
    assert m["within_11.25"] == pytest.approx(100 * (ang < 11.25).mean(), abs=1e-6)
    # the dataset's derived-normal option uses the same code
    ds = fixture_ds("train", derived_normals=True)
    assert ds.normals_source == "derived"
    torch.testing.assert_close(ds[list(ds.ids).index(k)]["normals"], derived)


# ---------------------------------------------------------------- layouts (a) and (b)


def write_folder(root: Path, fx: dict[str, np.ndarray], flag: int, split: str) -> None:
    """Frames of the fixture's official split ``flag`` in mtan's .npy layout under ``split``."""
    for sub in ("image", "label", "depth", "normal"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(np.flatnonzero(fx["split"] == flag)):
        label = np.where(fx["seg13"][k] == 255, -1, fx["seg13"][k]).astype(np.float32)
        arrays = {
            "image": fx["rgb"][k].astype(np.float32) / 255,
            "label": label,
            "depth": fx["depth"][k].astype(np.float32)[..., None],
            "normal": fx["normal"][k].astype(np.float32),
        }
        for sub, a in arrays.items():
            np.save(root / split / sub / f"{i}.npy", a)


def raw_ids(seg40: np.ndarray) -> np.ndarray:
    """Stand-in 894-class ids: 40-class c -> 7 + 11 c (an injective scatter), void -> 0."""
    return np.where(seg40 == 255, 0, 7 + 11 * seg40.astype(np.int64)).astype(np.uint16)


def write_mat(path: Path, fx: dict[str, np.ndarray]) -> None:
    """The fixture as an HDF5 file shaped like nyu_depth_v2_labeled.mat (axes reversed)."""
    with h5py.File(path, "w") as f:
        f["images"] = fx["rgb"].transpose(0, 3, 2, 1)  # (N, 3, W, H) uint8
        f["depths"] = fx["depth"].astype(np.float32).transpose(0, 2, 1)
        f["labels"] = raw_ids(fx["seg40"]).transpose(0, 2, 1)
        f["names"] = np.zeros((1, 894), np.uint32)  # other fields of the real file are ignored


def mappings(fx: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """895-entry 13- and 40-class mappings for :func:`raw_ids`, the 40 -> 13 part read off the
    fixture's own label pairs."""
    m13, m40 = np.full(895, 255), np.full(895, 255)
    valid = fx["seg40"] != 255
    for c40, c13 in set(zip(fx["seg40"][valid].tolist(), fx["seg13"][valid].tolist())):
        m13[7 + 11 * c40], m40[7 + 11 * c40] = c13, c40
    return m13, m40


def mat_v5(variables: dict[str, np.ndarray], compress: bool) -> bytes:
    """A MATLAB Level 5 file of double matrices, written from the format spec."""
    out = b"MATLAB 5.0 MAT-file, written by the mtlcv tests".ljust(116) + bytes(8)
    out += struct.pack("<H", 0x0100) + b"IM"

    def element(typ: int, data: bytes) -> bytes:
        return struct.pack("<II", typ, len(data)) + data + bytes(-len(data) % 8)

    for name, a in variables.items():
        a = np.atleast_2d(np.asarray(a, np.float64))
        body = element(6, struct.pack("<II", 6, 0))  # array flags: mxDOUBLE_CLASS
        body += element(5, struct.pack("<2i", *a.shape)) + element(1, name.encode())
        body += element(9, a.ravel(order="F").tobytes())
        matrix = element(14, body)
        out += struct.pack("<II", 15, len(z := zlib.compress(matrix))) + z if compress else matrix
    return out


@pytest.fixture(scope="module")
def layouts(fx, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nyuv2")
    write_folder(root / "npy", fx, 0, "train")
    write_folder(root / "npy", fx, 1, "val")
    write_mat(root / "nyu_depth_v2_labeled.mat", fx)
    frames = np.arange(1, len(fx["split"]) + 1)  # 1-based, as in splits.mat
    with h5py.File(root / "splits.mat", "w") as f:  # MATLAB v7.3 flavour: (N, 1) -> (1, N)
        f["trainNdxs"] = frames[fx["split"] == 0][None].astype(np.float64)
        f["testNdxs"] = frames[fx["split"] == 1][None].astype(np.float64)
    m13, m40 = mappings(fx)
    np.save(root / "map13.npy", m13)
    np.savetxt(root / "map40.txt", m40, fmt="%d")
    (root / "map13.mat").write_bytes(mat_v5({"mapping": m13[None]}, compress=True))
    normals = root / "normals"
    normals.mkdir()
    for k in np.flatnonzero(fx["has_normal"]):
        np.save(normals / f"{k + 1}.npy", fx["normal"][k].astype(np.float32))
    return {"root": root, "npy": root / "npy", "mat": root / "nyu_depth_v2_labeled.mat"}


@needs_fixture
def test_layout_a_reads_back_identically(layouts):
    for split in ("train", "test"):
        ours = DATASETS.create("nyuv2", split=split, root=str(layouts["npy"]))
        ref = fixture_ds(split)
        assert len(ours) == len(ref) and ours.task_options == ref.task_options
        for i in range(len(ref)):
            assert_same(ours[i], ref[i])
    assert check_dataset(layouts["npy"]) == []
    assert main_check(layouts["npy"]) == 0


@needs_fixture
def test_layout_a_val_fraction_holds_out_part_of_train(layouts):
    kw = {"root": str(layouts["npy"]), "val_fraction": 0.3}
    train, val = (DATASETS.create("nyuv2", split=s, **kw) for s in ("train", "val"))
    assert len(val) == 3 and len(train) == 7
    assert sorted([*train.ids, *val.ids]) == list(range(10))
    assert len(DATASETS.create("nyuv2", split="test", **kw)) == 18  # test stays the test set


@needs_fixture
def test_layout_b_reads_back_identically(layouts):
    root = layouts["root"]
    for mapping, classes in (("map13.npy", 13), ("map13.mat", 13), ("map40.txt", 40)):
        for split in ("train", "test"):
            ours = DATASETS.create(
                "nyuv2-mat", split=split, root=str(layouts["mat"]), mapping=str(root / mapping),
                num_classes=classes, normals_dir=str(root / "normals"),
            )  # fmt: skip
            ref = fixture_ds(split, num_classes=classes)
            assert len(ours) == len(ref) and ours.task_options == ref.task_options
            assert ours.normals_source == "ground truth"
            np.testing.assert_array_equal(ours.has["normals"], ref.has["normals"])
            for i in range(len(ref)):
                assert_same(ours[i], ref[i])
    # without a normals folder, normals are derived from depth and flagged as such
    derived = DATASETS.create("nyuv2-mat", split="train", root=str(root),  # folder -> the file
                              mapping=str(root / "map13.npy"))  # fmt: skip
    assert derived.normals_source == "derived"
    ref = fixture_ds("train", derived_normals=True)
    assert_same(derived[0], ref[0])
    # the h5py handle opened by reading must not travel to DataLoader workers
    assert pickle.loads(pickle.dumps(derived))[1]["image"].shape == (3, 240, 320)
    batch = next(iter(DataLoader(derived, batch_size=2, num_workers=2)))  # after the parent read
    torch.testing.assert_close(batch["depth"][1], ref[1]["depth"])
    # resizing to the published 288×384 protocol
    big = DATASETS.create("nyuv2-mat", split="test", root=str(root),
                          mapping=str(root / "map13.npy"), size=[288, 384])  # fmt: skip
    s = big[0]
    assert s["image"].shape == (3, 288, 384) and s["semseg"].shape == (288, 384)
    labels = set(fixture_ds("test")[0]["semseg"].unique().tolist())
    assert set(s["semseg"].unique().tolist()) <= labels
    assert check_dataset(layouts["mat"]) == []


def test_mat_v5_reader_matches_the_written_values(tmp_path):
    train, test = np.array([3.0, 4.0, 10.0]), np.array([1.0, 2.0])
    for compress in (False, True):
        p = tmp_path / f"splits{int(compress)}.mat"
        p.write_bytes(mat_v5({"trainNdxs": train[:, None], "testNdxs": test[None]}, compress))
        v = read_mat(p)
        np.testing.assert_array_equal(v["trainNdxs"], train[:, None])
        np.testing.assert_array_equal(v["testNdxs"], test[None])
        m = mat_v5({"a": np.arange(6.0).reshape(2, 3)}, compress)
        (tmp_path / "m.mat").write_bytes(m)
        np.testing.assert_array_equal(
            read_mat(tmp_path / "m.mat")["a"], np.arange(6.0).reshape(2, 3)
        )


# ---------------------------------------------------------------- metrics of simple predictors


def numpy_confusion_scores(target: np.ndarray, pred: np.ndarray, c: int) -> tuple[float, float]:
    valid = target != 255
    cm = np.bincount(target[valid] * c + pred[valid], minlength=c * c).reshape(c, c)
    tp, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    return 100 * (tp[union > 0] / union[union > 0]).mean(), 100 * tp.sum() / cm.sum()


@needs_fixture
def test_class_prior_on_all_654_official_test_label_maps():
    with np.load(FIXTURE / "nyuv2_test_labels.npz") as z:
        seg = z["seg13"].astype(np.int64)
    assert seg.shape == (654, 240, 320)
    counts = np.bincount(seg[seg != 255], minlength=13)
    prior = int(counts.argmax())  # the most frequent class: wall
    metric = create("semseg", num_classes=13).new_metric()
    logits = torch.nn.functional.one_hot(torch.tensor(prior), 13).float().view(1, 13, 1, 1)
    for start in range(0, 654, 109):
        target = torch.from_numpy(seg[start : start + 109])
        metric.update(logits.expand(len(target), 13, 240, 320), target)
    got = metric.compute()
    miou, acc = numpy_confusion_scores(seg, np.full_like(seg, prior), 13)
    assert got["miou"] == pytest.approx(miou, abs=1e-9)
    assert got["pixel_acc"] == pytest.approx(acc, abs=1e-9)
    # closed form: only the prior class has a non-zero IoU, and all 13 classes occur
    assert (counts > 0).all()
    assert acc == pytest.approx(100 * counts[prior] / counts.sum())
    assert miou == pytest.approx(100 * counts[prior] / counts.sum() / 13)


@needs_fixture
def test_mean_depth_predictor_on_the_fixture_depth_frames(fx):
    depth = fx["depth"][fx["has_depth"]].astype(np.float32)
    t = depth[depth > 0].astype(np.float64)
    mean = float(np.float32(t.mean()))  # the value the float32 prediction holds
    metric = create("depth").new_metric()
    target = torch.from_numpy(depth)[:, None]
    for start in range(0, len(target), 5):  # split into batches: the metric is over the split
        chunk = target[start : start + 5]
        metric.update(torch.full_like(chunk, mean), chunk)
    got = metric.compute()
    err = np.abs(mean - t)
    assert got["abs_err"] == pytest.approx(err.mean(), rel=1e-9)
    assert got["rel_err"] == pytest.approx((err / t).mean(), rel=1e-9)
    assert got["rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-9)
    assert got["delta1"] == pytest.approx(100 * (np.maximum(mean / t, t / mean) < 1.25).mean())


# ---------------------------------------------------------------- bad input


def make_folder(root: Path, n: int = 3, h: int = 8, w: int = 10) -> Path:
    """A tiny valid dataset in mtan's layout (random values)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            normal = rng.normal(size=(h, w, 3))
            np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", rng.integers(-1, 13, (h, w)).astype(float))
            np.save(root / split / "depth" / f"{i}.npy", rng.random((h, w, 1)).astype(np.float32))
            np.save(
                root / split / "normal" / f"{i}.npy",
                normal / np.linalg.norm(normal, axis=-1, keepdims=True),
            )
    return root


def one_line_error(exc: type, fn, *match: str) -> str:
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, (m, msg)
    return msg


def test_a_clean_tiny_folder_loads_and_checks(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    ds = DATASETS.create("nyuv2", split="train", root=str(root))
    assert len(ds) == 3 and ds[2]["semseg"].max() <= 255
    assert main_check(root) == 0
    assert "OK" in capsys.readouterr().out


def test_wrong_folder(tmp_path):
    root = make_folder(tmp_path / "d")
    create_ = lambda r: DATASETS.create("nyuv2", split="train", root=str(r))  # noqa: E731
    one_line_error(DataError, lambda: create_(tmp_path / "nowhere"), "nowhere", "not found")
    one_line_error(DataError, lambda: create_(root / "train"), "no train/ folder", "parent")
    one_line_error(ConfigError, lambda: DATASETS.create("nyuv2", split="train"), "data.root")
    bad_split = lambda: DATASETS.create("nyuv2", split="dev", root=str(root))  # noqa: E731
    one_line_error(ConfigError, bad_split, "unknown split 'dev'", "train, val, test")
    assert check_dataset(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: not found"]
    (tmp_path / "empty").mkdir()
    assert "cannot tell the layout" in check_dataset(tmp_path / "empty")[0]


def test_missing_modality_and_missing_file(tmp_path):
    root = make_folder(tmp_path / "d")
    for p in (root / "train" / "depth").iterdir():
        p.unlink()
    (root / "train" / "depth").rmdir()
    one_line_error(DataError, lambda: DATASETS.create("nyuv2", root=str(root)),
                   "train/depth", "missing modality")  # fmt: skip
    assert any("train/depth: missing modality" in p for p in check_dataset(root))
    root = make_folder(tmp_path / "e")
    (root / "val" / "normal" / "1.npy").unlink()
    one_line_error(DataError, lambda: DATASETS.create("nyuv2", split="test", root=str(root)),
                   "val/normal/1.npy", "file not found")  # fmt: skip
    assert check_dataset(root) == [f"{root / 'val' / 'normal' / '1.npy'}: file not found"]


@pytest.mark.parametrize(
    "sub,value,message",
    [
        ("label", 13.0, "label id 13 is outside [0, 13)"),
        ("label", 2.5, "non-integer"),
        ("depth", np.nan, "depth has NaN"),
        ("depth", -1.0, "negative"),
        ("image", 255.0, "image values span"),
        ("normal", 200.0, "normal vectors have length"),
    ],
)
def test_bad_values_name_the_file(tmp_path, sub, value, message):
    root = make_folder(tmp_path / "d")
    p = root / "train" / sub / "1.npy"
    a = np.load(p)
    a.reshape(-1)[5] = value
    np.save(p, a)
    ds = DATASETS.create("nyuv2", split="train", root=str(root))
    ds[0]  # a good frame still loads
    one_line_error(DataError, lambda: ds[1], str(p), message)
    problems = check_dataset(root)
    assert len(problems) == 1 and str(p) in problems[0] and message in problems[0]


def test_truncated_npy(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    p = root / "val" / "depth" / "2.npy"
    p.write_bytes(p.read_bytes()[:-50])
    ds = DATASETS.create("nyuv2", split="test", root=str(root))
    one_line_error(DataError, lambda: ds[2], str(p), "truncated")
    assert main_check(root) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and str(p) in out[0] and "1 problem(s)" in out[1]


def test_mat_without_expected_fields_and_other_bad_mat_input(tmp_path):
    bad = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(bad, "w") as f:
        f["images"] = np.zeros((2, 3, 10, 8), np.uint8)
    m = tmp_path / "map.npy"
    np.save(m, np.zeros(895))
    open_ = lambda **kw: DATASETS.create("nyuv2-mat", root=str(bad), mapping=str(m), **kw)  # noqa: E731
    one_line_error(DataError, open_, str(bad), "missing field(s) depths, labels")
    assert "missing field(s) depths, labels" in check_dataset(bad)[0]
    bad.write_text("not a mat file")
    one_line_error(DataError, open_, str(bad), "not a MATLAB v7.3")
    with h5py.File(bad, "w") as f:
        f["images"] = np.zeros((2, 3, 10, 8), np.uint8)
        f["depths"] = np.zeros((2, 10, 8), np.float32)
        f["labels"] = np.zeros((2, 10, 8), np.uint16)
    one_line_error(DataError, open_, "splits.mat", "file not found")
    (tmp_path / "splits.mat").write_bytes(mat_v5({"trainNdxs": [[1.0]]}, compress=False))
    one_line_error(DataError, open_, "splits.mat", "missing field(s) testNdxs")
    (tmp_path / "splits.mat").write_bytes(mat_v5({"trainNdxs": [[1.0]], "testNdxs": [[2.0]]}, True))
    assert len(open_(split="test")) == 1
    one_line_error(ConfigError, lambda: DATASETS.create("nyuv2-mat", root=str(bad)), "mapping")
    np.save(m, np.zeros(40))
    one_line_error(DataError, open_, str(m), "has 40 entries, expected 895")
    np.save(m, np.full(895, 13))
    one_line_error(DataError, lambda: load_mapping(m, 13), "class 13")
    with h5py.File(bad, "a") as f:
        f["depths"][1, 3, 3] = np.nan
    assert check_dataset(bad) == [f"{bad} frame 2: depth has NaN or infinite values (use 0 for "
                                  "missing)"]  # fmt: skip
