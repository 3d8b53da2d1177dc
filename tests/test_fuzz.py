"""Property-based tests (hypothesis): any malformed input to the config loader, ``--set``, each
dataset reader and ``mtlcv data check`` gives a one-line MtlcvError (exit code 2 in the CLI), never
another exception and never a silently wrong value.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

h5py = pytest.importorskip("h5py")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mtlcv.cli import main  # noqa: E402
from mtlcv.config import ExperimentConfig, apply_overrides, from_dict, load  # noqa: E402
from mtlcv.errors import ConfigError, MtlcvError  # noqa: E402

#: CI runs a fixed sample (derandomised); MTLCV_FUZZ_EXAMPLES=N explores N fresh random ones
_EXPLORE = int(os.environ.get("MTLCV_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXPLORE or 60, deadline=None, derandomize=not _EXPLORE,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6,
)


def _sections() -> dict[str, list[str]]:
    hints = typing.get_type_hints(ExperimentConfig)
    out = {}
    for f in dataclasses.fields(ExperimentConfig):
        tp = hints[f.name]
        out[f.name] = [g.name for g in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) \
            else []
    return out


SECTIONS = _sections()


@st.composite
def config_dicts(draw) -> dict[str, Any]:
    """Mostly real keys (and a few unknown ones) with values of any type."""
    out: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=5, unique=True)):
        fields = SECTIONS.get(key, [])
        if fields and draw(st.booleans()):
            sub = draw(st.lists(st.sampled_from([*fields, "nope"]), max_size=4, unique=True))
            out[key] = {k: draw(values) for k in sub}
        else:
            out[key] = draw(values)
    return out


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text


def _check_loaded(cfg: ExperimentConfig, given_data: dict[str, Any]) -> None:
    """A config that loads holds exactly what was given, and sensible values."""
    for section, sub in given_data.items():
        if isinstance(sub, dict) and SECTIONS.get(section):
            for k, v in sub.items():
                got = getattr(getattr(cfg, section), k)
                if isinstance(v, float) or isinstance(got, float):
                    assert got == float(v) or (math.isnan(got) and math.isnan(float(v)))
                else:
                    assert got == v, (section, k, got, v)
    assert math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0
    assert cfg.optim.weight_decay >= 0 and 0 <= cfg.optim.momentum < 1
    assert math.isfinite(cfg.schedule.gamma) and cfg.schedule.gamma > 0
    assert cfg.tasks and len(set(cfg.tasks)) == len(cfg.tasks)
    assert cfg.data.batch_size >= 1 and cfg.train.epochs >= 1 and 0 <= cfg.seed < 2**64


@FUZZ
@given(config_dicts())
def test_config_loader_any_mapping(data):
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        _one_line(exc)
    else:
        _check_loaded(cfg, data)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 config_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_config_loader_any_file(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        try:
            load(path)
        except ConfigError as exc:
            _one_line(exc)


@FUZZ
@given(st.lists(st.text(max_size=40) | st.builds(
    lambda k, v: f"{k}={v}",
    st.sampled_from(["optim.lr", "train.epochs", "tasks", "data.batch_size", "seed",
                     "model.backbone.width", "train.on_nonfinite", "a..b", "optim", ""]),
    st.text(max_size=20)), max_size=3))
def test_set_overrides_any_text(items):
    try:
        data = apply_overrides({}, items)
    except ConfigError as exc:
        _one_line(exc)
        return
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        _one_line(exc)
    else:
        _check_loaded(cfg, data)


@FUZZ
@given(st.integers(-5, 10**6))
def test_set_integer_round_trip(n):
    try:
        cfg = load(None, [f"train.epochs={n}"])
    except ConfigError:
        assert n < 1
    else:
        assert cfg.train.epochs == n


# ---------------------------------------------------------------------- dataset readers
def _items_follow_the_contract(ds: Any, limit: int = 2) -> None:
    from mtlcv.data.base import collate
    from mtlcv.registry import TASKS

    opts = getattr(ds, "task_options", {}) or {}
    for i in range(min(len(ds), limit)):
        batch = collate([ds[i]])  # a batch of one, as the loaders form it (boxes padded)
        image = batch["image"]
        assert image.dtype.is_floating_point and torch.isfinite(image).all()
        assert float(image.min()) >= 0 and float(image.max()) <= 1
        for t in ds.targets:
            if t not in batch:
                continue
            task = TASKS.create(t, **opts.get(t, {}))
            task.check_target(batch[t], image)  # raises DataError when broken


def _attempt(make: Any) -> None:
    try:
        ds = make()
        _items_follow_the_contract(ds)
    except MtlcvError as exc:
        _one_line(exc)


@st.composite
def arrays(draw, shape: tuple[int, ...]) -> np.ndarray:
    """An array near ``shape``: right or wrong shape, any dtype, ordinary or extreme values."""
    dims = list(shape)
    mode = draw(st.sampled_from(["same", "dim", "drop", "add"]))
    if mode == "dim" and dims:
        k = draw(st.integers(0, len(dims) - 1))
        dims[k] = draw(st.integers(0, 5))
    elif mode == "drop" and dims:
        dims.pop()
    elif mode == "add":
        dims.append(draw(st.integers(1, 3)))
    dtype = draw(st.sampled_from(["uint8", "int64", "float32", "float64", "bool", "int8"]))
    fill = draw(st.sampled_from(["random", "nan", "inf", "neg", "big", "zero"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = rng.random(dims) * 3
    a = {"nan": np.full(dims, np.nan), "inf": np.full(dims, np.inf), "neg": -a - 1,
         "big": a * 1e6, "zero": np.zeros(dims)}.get(fill, a)
    with np.errstate(invalid="ignore", over="ignore"):
        return a.astype(dtype)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    from mtlcv.data.scenes import write_cache

    return write_cache(tmp_path_factory.mktemp("fz") / "c", n=3, size=(8, 8), progress=False)


SCENES_SHAPES = {"image": (1, 3, 8, 8), "semseg": (1, 8, 8), "depth": (1, 1, 8, 8),
                 "normals": (1, 3, 8, 8), "edges": (1, 1, 8, 8), "classification": (1,),
                 # the detection boxes (cache format 2), flat over the split's images
                 "boxes": (2, 4), "box_class": (2,), "box_object": (2,), "box_count": (1,)}


@FUZZ
@given(st.sampled_from([*SCENES_SHAPES, "meta", "truncate"]), st.data())
def test_scenes_reader(tiny_cache, what, data):
    from mtlcv.data.scenes import ScenesDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c"
        shutil.copytree(tiny_cache, root)
        if what == "meta":
            meta = json.loads((root / "meta.json").read_text())
            key = data.draw(st.sampled_from([*meta, "format"]))
            meta[key] = data.draw(values)
            (root / "meta.json").write_text(json.dumps(meta))
        elif what == "truncate":
            p = root / "train.npz"
            p.write_bytes(p.read_bytes()[: data.draw(st.integers(0, p.stat().st_size))])
        else:
            with np.load(root / "train.npz") as z:
                a = {k: z[k] for k in z.files}
            a[what] = data.draw(arrays(SCENES_SHAPES[what]))
            np.savez_compressed(root / "train.npz", **a)
        _attempt(lambda: ScenesDataset(root, "train"))


NYU_SHAPES = {"image": (6, 8, 3), "label": (6, 8), "depth": (6, 8), "normal": (6, 8, 3)}


def _nyu_folder(root: Path, broken: str, arr: np.ndarray | bytes) -> None:
    rng = np.random.default_rng(0)
    good = {"image": rng.random((6, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 13, (6, 8)).astype(np.int64),
            "depth": rng.random((6, 8)).astype(np.float32) + 0.5,
            "normal": np.tile(np.float32([0, 0, 1]), (6, 8, 1))}
    for split in ("train", "val"):
        for sub, a in good.items():
            folder = root / split / sub
            folder.mkdir(parents=True)
            for i in range(2):
                path = folder / f"{i}.npy"
                if split == "train" and sub == broken and i == 0:
                    if isinstance(arr, bytes):
                        path.write_bytes(arr)
                    else:
                        np.save(path, arr)
                else:
                    np.save(path, a)


@FUZZ
@given(st.sampled_from(list(NYU_SHAPES)), st.data())
def test_nyuv2_folder_reader_and_data_check(capsys, what, data):
    from mtlcv.registry import DATASETS

    arr = data.draw(st.one_of(arrays(NYU_SHAPES[what]), st.binary(max_size=64)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _nyu_folder(root, what, arr)
        _attempt(lambda: DATASETS.create("nyuv2", split="train", root=str(root)))
        assert main(["data", "check", str(root)]) in (0, 2)
        out = capsys.readouterr()
        assert "Traceback" not in out.err and "Traceback" not in out.out


@FUZZ
@given(st.sampled_from(["images", "depths", "labels", "missing", "not hdf5"]), st.data())
def test_nyuv2_mat_reader_and_data_check(capsys, what, data):
    from mtlcv.registry import DATASETS

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nyu_depth_v2_labeled.mat"
        if what == "not hdf5":
            path.write_bytes(data.draw(st.binary(max_size=200)))
        else:
            shapes = {"images": (2, 3, 8, 6), "depths": (2, 8, 6), "labels": (2, 8, 6)}
            rng = np.random.default_rng(0)
            good = {"images": rng.integers(0, 255, shapes["images"]).astype(np.uint8),
                    "depths": (rng.random(shapes["depths"]) + 0.5).astype(np.float32),
                    "labels": rng.integers(0, 40, shapes["labels"]).astype(np.uint16)}
            with h5py.File(path, "w") as f:
                for k, a in good.items():
                    if k == what:
                        a = data.draw(arrays(shapes[k]))
                    if what != "missing" or k != "labels":
                        f.create_dataset(k, data=a)
        for split in ("train", "test"):
            _attempt(lambda s=split: DATASETS.create("nyuv2-mat", split=s, root=str(path),
                                                     splits=None))
        assert main(["data", "check", str(path)]) in (0, 2)
        out = capsys.readouterr()
        assert "Traceback" not in out.err and "Traceback" not in out.out


FIXTURE_SHAPES = {"index": (2,), "split": (2,), "rgb": (2, 6, 8, 3), "depth": (2, 6, 8),
                  "seg13": (2, 6, 8), "seg40": (2, 6, 8), "normal": (2, 6, 8, 3),
                  "has_depth": (2,), "has_seg": (2,), "has_normal": (2,)}


@FUZZ
@given(st.sampled_from([*FIXTURE_SHAPES, "truncate"]), st.data())
def test_nyuv2_fixture_reader_and_data_check(capsys, what, data):
    from mtlcv.registry import DATASETS

    rng = np.random.default_rng(0)
    good = {"index": np.arange(2), "split": np.array([0, 1]),
            "rgb": rng.integers(0, 255, (2, 6, 8, 3)).astype(np.uint8),
            "depth": (rng.random((2, 6, 8)) + 0.5).astype(np.float32),
            "seg13": rng.integers(0, 13, (2, 6, 8)).astype(np.uint8),
            "seg40": rng.integers(0, 40, (2, 6, 8)).astype(np.uint8),
            "normal": np.tile(np.float32([0, 0, 1]), (2, 6, 8, 1)),
            "has_depth": np.ones(2, bool), "has_seg": np.ones(2, bool),
            "has_normal": np.ones(2, bool)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nyuv2_mini_real.npz"
        if what != "truncate":
            good[what] = data.draw(arrays(FIXTURE_SHAPES[what]))
        buf = io.BytesIO()
        np.savez(buf, **good)
        raw = buf.getvalue()
        if what == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        path.write_bytes(raw)
        for split in ("train", "test"):
            _attempt(lambda s=split: DATASETS.create("nyuv2-fixture", split=s, root=tmp))
        assert main(["data", "check", tmp]) in (0, 2)
        out = capsys.readouterr()
        assert "Traceback" not in out.err and "Traceback" not in out.out
