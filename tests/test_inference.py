"""Using a trained model: checkpoint metadata, mtlcv.load / predict, mtlcv predict, export.

Detection (decoded at the model's input size, boxes mapped to the image, JSON + overlay) is
tested on the same tiny run, whose detection head is edited so that it detects something.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mtlcv
from mtlcv.cli import main
from mtlcv.config import from_dict
from mtlcv.data.scenes import DET_CLASSES
from mtlcv.engine.experiment import build_model
from mtlcv.engine.metadata import FORMAT, describe
from mtlcv.engine.trainer import train
from mtlcv.errors import CheckpointError, DataError
from mtlcv.inference import ExportError, Predictor, export
from mtlcv.inference.commands import output_stems, predict_files
from mtlcv.inference.images import read_image
from mtlcv.inference.predictor import build_from_meta
from mtlcv.inference.writers import WRITERS, RawWriter, Target, palette, writer_for
from mtlcv.registry import ARCHS, TASKS

# the tests load TorchScript files themselves; PyTorch 2.13 deprecates torch.jit (still shipped)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

TASKS6 = ["semseg", "depth", "normals", "edges", "classification", "detection"]
README = Path(__file__).resolve().parents[1] / "README.md"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nyuv2-fixture"
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
NO_ONNX = "onnx and onnxruntime are not installed (pip install 'mtlcv[export]')"


@pytest.fixture(scope="module")
def run_dir(scenes_root, tmp_path_factory) -> Path:
    """A tiny HPS run with every task kind (three steps on the 32x48 scenes cache)."""
    out = tmp_path_factory.mktemp("inference") / "run"
    cfg = {
        "name": "tiny",
        "tasks": TASKS6,
        "data": {"name": "scenes", "root": scenes_root, "batch_size": 4,
                 "options": {"n": 48, "size": [32, 48], "seed": 0}},
        "model": {"arch": "hps", "backbone": {"name": "tiny", "width": 8}},
        "train": {"epochs": 1, "max_steps": 3, "progress": False, "threads": 1},
    }  # fmt: skip
    train(from_dict(cfg), out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def model(run_dir) -> Predictor:
    return mtlcv.load(run_dir, device="cpu")


def one_line(text: str) -> bool:
    return text.strip().count("\n") == 0 and "Traceback" not in text


# ---------------------------------------------------------------- checkpoint metadata


def test_checkpoint_describes_its_model_in_plain_data(run_dir):
    best = torch.load(run_dir / "best.pt", weights_only=True)  # plain data only: loads safely
    last = torch.load(run_dir / "last.pt", weights_only=True)  # the training state too
    assert best["meta"] == last["meta"]
    meta = best["meta"]
    assert meta["format"] == FORMAT and meta["mtlcv_version"] == mtlcv.__version__
    assert meta["model"] == {"arch": "hps", "backbone": {"name": "tiny", "width": 8},
                             "head": {"name": "light"}, "options": {}}  # fmt: skip
    assert list(meta["tasks"]) == TASKS6
    assert meta["tasks"]["semseg"]["options"] == {"num_classes": 13}
    assert meta["tasks"]["semseg"]["class_names"][:2] == ["bed", "books"]
    assert meta["tasks"]["classification"] == {
        "kind": "classification", "options": {"num_classes": 4}, "channels": 4, "dense": False,
        "class_names": ["bedroom", "living_room", "office", "dining_room"],
    }  # fmt: skip
    assert meta["input"]["size"] == [32, 48] and meta["input"]["range"] == [0.0, 1.0]
    assert meta["input"]["normalization"]["mean"] == [0.485, 0.456, 0.406]


# ---------------------------------------------------------------- mtlcv.load / predict


def test_import_mtlcv_stays_light_and_load_is_lazy():
    code = "import sys, mtlcv; assert 'torch' not in sys.modules, 'import mtlcv imported torch'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from mtlcv import load
    from mtlcv.inference import load as inference_load

    assert mtlcv.load is load is inference_load
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        mtlcv.lod  # noqa: B018


def test_predict_at_model_size_is_the_model_itself(model):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        ref = model.model(x)
    raw = model.predict(x, raw=True)
    for n in TASKS6:  # detection's raw map too: at the model's size, as the model gave it
        torch.testing.assert_close(raw[n], ref[n], rtol=0, atol=1e-6)
    out = model.predict(x)
    assert torch.equal(out["semseg"], ref["semseg"].argmax(1))
    assert isinstance(out["detection"], list) and len(out["detection"]) == 2  # one per image
    for got, want in zip(out["detection"], model.tasks["detection"].postprocess(ref["detection"])):
        assert got.keys() == want.keys()
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-4)
    assert torch.equal(out["classification"], ref["classification"].argmax(1))
    assert out["edges"].dtype == torch.bool and out["edges"].shape == (2, 1, 32, 48)
    assert torch.allclose(out["normals"].norm(dim=1), torch.ones(2, 32, 48), atol=1e-5)


def test_other_sizes_are_resized_in_and_back(model):
    torch.manual_seed(2)
    x = torch.rand(3, 64, 80)
    raw = model.predict(x, raw=True)
    with torch.no_grad():
        small = F.interpolate(x[None], (32, 48), mode="bilinear", antialias=True)
        ref = model.model(small)
    # detection's raw map is never resized: its distances are in the model input's pixels
    torch.testing.assert_close(raw["detection"], ref["detection"][0], rtol=0, atol=1e-5)
    back = F.interpolate(ref["depth"], (64, 80), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(raw["depth"], back, rtol=0, atol=1e-5)
    torch.testing.assert_close(raw["classification"], ref["classification"][0], rtol=0, atol=1e-6)
    assert model.predict(x)["semseg"].shape == (64, 80)


def test_fit_pad_keeps_the_aspect_ratio(model):
    x = torch.rand(3, 20, 120)  # much wider than the model's 32x48
    prepared, place = model.prepare(x, "pad")
    assert prepared.shape == (3, 32, 48)
    assert (place.height, place.width) == (8, 48) and place.top == 12 and place.left == 0
    assert place.to_image(place.top, place.left) == (0, 0)
    assert place.to_image(place.top + place.height, place.left + place.width) == (20, 120)
    fill = torch.tensor(model.fill).view(3, 1)
    assert torch.allclose(prepared[:, 0], fill.expand(3, 48))  # padding is the model's mean
    out = model.predict(x, fit="pad")
    assert out["semseg"].shape == (20, 120) and out["depth"].shape == (1, 20, 120)


def test_predict_accepts_arrays_tensors_pil_paths_batches_and_lists(model, tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    ref = model.predict(a, raw=True)["depth"]
    same = [
        torch.from_numpy(a).permute(2, 0, 1).float() / 255,
        torch.from_numpy(a).permute(2, 0, 1),
        Image.fromarray(a),
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        a.astype(np.float32) / 255,
    ]
    for im in same:
        torch.testing.assert_close(model.predict(im, raw=True)["depth"], ref, rtol=0, atol=1e-5)
    batch = model.predict(np.stack([a, a[::-1].copy()]))
    assert batch["semseg"].shape == (2, 40, 50) and batch["classification"].shape == (2,)
    outs = model.predict([a, a[:20], np.asarray(Image.fromarray(a).convert("L"))])
    assert [o["semseg"].shape for o in outs] == [(40, 50), (20, 50), (40, 50)]
    with pytest.raises(DataError, match=r"values span \[0, 255\]"):
        model.predict(a.astype(np.float32))
    with pytest.raises(DataError, match="expected 1, 3 or 4"):
        model.predict(torch.rand(5, 8, 8))
    with pytest.raises(DataError, match="not an image"):
        (tmp_path / "b.png").write_text("text")
        model.predict(tmp_path / "b.png")


def test_readme_example_runs(run_dir, tmp_path, monkeypatch):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "mtlcv.load(" in b)
    src = re.search(r"mtlcv\.load\(\"([^\"]+)\"", code).group(1)
    photo = re.search(r"\.predict\(\"([^\"]+)\"", code).group(1)
    shutil.copytree(run_dir, tmp_path / src)
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(tmp_path / photo)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})


# ---------------------------------------------------------------- incompatible checkpoints


def _with(run_dir: Path, tmp: Path, edit) -> Path:
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    edit(ckpt)
    path = tmp / "edited.pt"
    torch.save(ckpt, path)
    return path


def test_checkpoint_without_metadata_uses_its_run_config(run_dir, model, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    ckpt = torch.load(old / "best.pt", weights_only=True)
    del ckpt["meta"]
    torch.save(ckpt, old / "best.pt")
    x = torch.rand(3, 32, 48)
    for source in (old, old / "best.pt"):
        again = mtlcv.load(source, device="cpu")
        assert again.meta["tasks"] == model.meta["tasks"]
        assert torch.equal(again.predict(x)["semseg"], model.predict(x)["semseg"])
    shutil.copy(old / "best.pt", tmp_path / "lonely.pt")
    with pytest.raises(CheckpointError, match="carries no model description") as e:
        mtlcv.load(tmp_path / "lonely.pt")
    assert one_line(str(e.value))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["meta"].update(format=FORMAT + 1), "upgrade mtlcv"),
        (lambda c: c["meta"]["model"].update(arch="transformer9000"), "cannot be rebuilt here"),
        (lambda c: c["meta"]["tasks"]["depth"].update(kind="lidar"), "unknown task 'lidar'"),
        (lambda c: c["model"].pop(next(iter(c["model"]))), "missing keys"),
        (lambda c: c["meta"]["tasks"]["semseg"]["options"].update(num_classes=9), "shape mis"),
        (lambda c: c.pop("model"), "not an mtlcv training checkpoint"),
        (lambda c: c.update(meta="v1"), "not an mtlcv checkpoint description"),
        # a pickled object that is not plain data: never unpickled (it could run code)
        (lambda c: c.update(extra=Fraction(1, 3)), "refusing to unpickle"),
    ],
    ids=["newer-format", "unknown-arch", "unknown-kind", "missing-key", "wrong-shape",
         "no-weights", "bad-meta", "unsafe-object"],
)  # fmt: skip
def test_incompatible_checkpoint_is_refused_in_one_line(run_dir, tmp_path, edit, message):
    path = _with(run_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        mtlcv.load(path)
    assert one_line(str(e.value)) and "edited.pt" in str(e.value)


def test_cli_refuses_a_bad_checkpoint_with_exit_2(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    for cmd in (
        ["predict", "--input", str(img), "--out", str(tmp_path / "o")],
        ["export", "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
    ):
        assert main([*cmd, "--checkpoint", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and "x.pt" in err


# ---------------------------------------------------------------- mtlcv predict


@pytest.mark.skipif(
    not (FIXTURE / "nyuv2_mini_real.npz").is_file(),
    reason=f"real NYUv2 fixture not found at {FIXTURE} (shared/data is not checked out here)",
)
def test_predict_cli_on_real_nyuv2_frames_writes_every_output(model, run_dir, tmp_path, capsys):
    with np.load(FIXTURE / "nyuv2_mini_real.npz") as z:
        rgb = z["rgb"][:6]
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, a in enumerate(rgb):
        Image.fromarray(a).save(frames / (f"nyu{i}.png" if i < 4 else f"nyu{i}.jpg"), quality=95)
    (frames / "notes.txt").write_text("not an image")
    (frames / "cut.png").write_bytes((frames / "nyu0.png").read_bytes()[:300])
    out = tmp_path / "out"
    rc = main(["predict", "--run", str(run_dir), "--input", str(frames), "--out", str(out),
               "--batch-size", "4", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1  # two files could not be read; the six frames were still predicted
    assert "notes.txt: not an image" in captured.err and "cut.png: unreadable" in captured.err
    assert re.search(r"predicted 6 images in [\d.]+ s .*; 2 files skipped", captured.out)
    summary = json.loads((out / "predictions.json").read_text())
    assert len(summary["images"]) == 6 and len(summary["failed"]) == 2
    legend = json.loads((out / "semseg.legend.json").read_text())["classes"]
    assert [c["name"] for c in legend][:3] == ["bed", "books", "ceiling"]
    for i in range(6):
        stem, h, w = f"nyu{i}", 240, 320
        image = Image.open(frames / (f"{stem}.png" if i < 4 else f"{stem}.jpg"))
        pred = model.predict(image)
        seg, labels = Image.open(out / "semseg" / f"{stem}.png"), Image.open(
            out / "semseg" / f"{stem}_labels.png")  # fmt: skip
        assert seg.mode == "RGB" and seg.size == (w, h) and labels.mode == "L"
        assert np.array_equal(np.asarray(labels), pred["semseg"].numpy())
        assert np.array_equal(np.asarray(seg), palette(13)[pred["semseg"].numpy()])
        mm = np.asarray(Image.open(out / "depth" / f"{stem}_mm.png"))
        assert mm.dtype == np.uint16 and mm.shape == (h, w)
        expect = np.clip(np.round(pred["depth"][0].numpy().astype(np.float64) * 1000), 0, 65535)
        assert np.abs(mm.astype(np.int64) - expect).max() <= 1
        assert Image.open(out / "depth" / f"{stem}.png").mode == "RGB"
        normals = np.asarray(Image.open(out / "normals" / f"{stem}.png")).astype(np.float64)
        decoded = normals / 255 * 2 - 1
        assert np.abs(np.linalg.norm(decoded, axis=-1) - 1).max() < 0.02
        assert Image.open(out / "edges" / f"{stem}_edges.png").size == (w, h)
        cls = json.loads((out / "classification" / f"{stem}.json").read_text())
        assert cls["class"] == int(pred["classification"]) and len(cls["top"]) == 4
        assert Image.open(out / "classification" / f"{stem}_overlay.png").size == (w, h)
        det = json.loads((out / "detection" / f"{stem}.json").read_text())
        assert det["size"] == [h, w] and len(det["detections"]) == len(pred["detection"]["boxes"])
        assert Image.open(out / "detection" / f"{stem}_overlay.png").size == (w, h)


def test_predict_cli_empty_or_missing_input_is_one_line_exit_2(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for spec, message in [
        (tmp_path / "empty", "the folder holds no files"),
        (tmp_path / "nothing", "no such file or folder"),
        (tmp_path / "*.png", "the pattern matches no file"),
    ]:
        rc = main(["predict", "--run", str(run_dir), "--input", str(spec), "--out",
                   str(tmp_path / "out")])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and one_line(err) and message in err
    image, taken = tmp_path / "a.png", tmp_path / "taken"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    taken.write_text("a file")
    assert main(["predict", "--run", str(run_dir), "--input", str(image), "--out", str(taken)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert main(["export", "--run", str(run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "is a folder; expected the file" in capsys.readouterr().err


def test_predict_glob_and_repeated_names(model, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / sub / "x.png")
    summary = predict_files(model, [str(tmp_path / "**" / "*.png")], tmp_path / "out")
    assert len(summary["images"]) == 2
    assert (tmp_path / "out" / "depth" / "x_mm.png").is_file()
    assert (tmp_path / "out" / "depth" / "x_2_mm.png").is_file()
    assert output_stems([Path("a/x.png"), Path("b/x.jpg"), Path("y.png")]) == ["x", "x_2", "y"]


def test_writers_follow_the_task_kind_not_the_name(model, tmp_path):
    """Tasks named ``room`` and ``seg`` are written by the classification / semseg writers."""
    meta = {**model.meta, "tasks": {
        "seg": {**model.meta["tasks"]["semseg"]},
        "room": {**model.meta["tasks"]["classification"]},
    }}  # fmt: skip
    net, tasks = build_from_meta(meta, "test")
    renamed = Predictor(net, tasks, meta, torch.device("cpu"))
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "im.png")
    predict_files(renamed, [str(tmp_path / "im.png")], tmp_path / "out")
    assert (tmp_path / "out" / "seg.legend.json").is_file()
    assert (tmp_path / "out" / "seg" / "im_labels.png").is_file()
    assert json.loads((tmp_path / "out" / "room" / "im.json").read_text())["name"] in (
        "bedroom", "living_room", "office", "dining_room")  # fmt: skip
    assert set(WRITERS) >= {"semseg", "depth", "normals", "edges", "classification", "detection"}
    raw = writer_for("a-kind-without-writer")
    assert isinstance(raw, RawWriter)
    record = raw.write(Target(tmp_path / "out", "t", "im"), None, torch.ones(2, 3), None, None)
    assert np.array_equal(np.load(tmp_path / "out" / record["files"][0]), np.ones((2, 3)))


def test_palette_colours_are_distinct_and_never_black():
    p = palette(256)
    assert len({tuple(c) for c in p.tolist()}) == 256 and not (p == 0).all(axis=1).any()
    assert palette(13).tolist() == palette(256)[:13].tolist()  # fixed: independent of n


# ---------------------------------------------------------------- detection


def _detector(run_dir: Path, tmp: Path, shift: float) -> Path:
    """The run's checkpoint with ``shift`` added to its detection head's class logits: three
    training steps leave every score under the decoding threshold (0.05); +6 makes the trained,
    spatially varying maps give boxes of several classes and sizes, -50 makes sure of none."""

    def edit(ckpt):
        n = ckpt["meta"]["tasks"]["detection"]["channels"]
        key = [k for k, v in ckpt["model"].items()
               if k.startswith("heads.detection.") and k.endswith(".bias") and v.shape == (n,)]
        ckpt["model"][key[-1]][: n - 5] += shift  # channels [0, C) are the class logits

    return _with(run_dir, tmp, edit)


def _decoded_and_mapped(model: Predictor, image: torch.Tensor, fit: str) -> dict:
    """The reference: the task's own decoding of the model's output at its input size, the
    box corners then mapped by the placement (clipped to the image, empty boxes dropped)."""
    x, place = model.prepare(image, fit)
    with torch.no_grad():
        det = model.tasks["detection"].postprocess(model.model(x[None])["detection"])[0]
    b = det["boxes"]
    h, w = place.size
    xs = ((b[:, [0, 2]] - place.left) * w / place.width).clamp(0, w)
    ys = ((b[:, [1, 3]] - place.top) * h / place.height).clamp(0, h)
    keep = (xs[:, 1] > xs[:, 0]) & (ys[:, 1] > ys[:, 0])
    boxes = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)[keep]
    return {"boxes": boxes, "scores": det["scores"][keep], "labels": det["labels"][keep],
            "place": place}  # fmt: skip


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_predict_writes_detections_decoded_at_the_model_size_and_mapped_back(
    run_dir, tmp_path, capsys, fit
):
    ckpt = _detector(run_dir, tmp_path, shift=6.0)
    rng = np.random.default_rng(3)
    h, w = 80, 200  # 2.5x / 4.2x the model's 32x48, and another aspect ratio: pad adds rows
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "im.png"),
               "--out", str(out), "--fit", fit, "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    model = mtlcv.load(ckpt, device="cpu")
    image = read_image(tmp_path / "im.png")
    ref = _decoded_and_mapped(model, image, fit)
    if fit == "pad":
        assert ref["place"].top > 0 and ref["place"].height < 32  # a real border to cut
    record = json.loads((out / "detection" / "im.json").read_text())
    dets = record["detections"]
    assert record["size"] == [h, w] and len(dets) == len(ref["boxes"]) >= 3
    assert len({d["class"] for d in dets}) >= 2
    boxes = torch.tensor([d["box"] for d in dets])
    torch.testing.assert_close(boxes, ref["boxes"], rtol=0, atol=0.006)  # 2 decimals in JSON
    assert (boxes[:, 2] > 48).any() and (boxes[:, 3] > 32).any()  # image pixels, not input
    assert [d["class"] for d in dets] == ref["labels"].tolist()
    np.testing.assert_allclose([d["score"] for d in dets], ref["scores"].numpy(), atol=6e-5)
    assert model.class_names["detection"] == list(DET_CLASSES)
    assert [d["name"] for d in dets] == [DET_CLASSES[d["class"]] for d in dets]
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["images"][0]["outputs"]["detection"]["count"] == len(dets)
    # the API gives the same boxes, as tensors
    api = model.predict(tmp_path / "im.png", fit=fit)["detection"]
    torch.testing.assert_close(api["boxes"], ref["boxes"], rtol=0, atol=1e-4)
    # the overlay: the input where nothing is drawn, the best box's class colour on its
    # bottom edge (the best box is drawn last; its label sits at its top)
    overlay = np.asarray(Image.open(out / "detection" / "im_overlay.png"))
    src = np.asarray(Image.open(tmp_path / "im.png"))
    assert overlay.shape == src.shape and (overlay != src).any()
    x1, y2, x2 = dets[0]["box"][0], dets[0]["box"][3], dets[0]["box"][2]
    row, col = int(np.ceil(y2)) - 1, (int(np.floor(x1)) + int(np.ceil(x2)) - 1) // 2
    assert overlay[row, col].tolist() == palette(len(DET_CLASSES))[dets[0]["class"]].tolist()
    boxed = np.zeros((h, w), bool)  # every changed pixel is on a box or on its label, drawn
    for d in dets:  # above it (<= 20 px) and moved left to stay inside the image (<= 100 px)
        bx1, by1, bx2, by2 = d["box"]
        boxed[max(0, int(by1) - 20) : int(np.ceil(by2)), max(0, min(int(bx1), w - 100)) :] = True
    assert not ((overlay != src).any(-1) & ~boxed).any()


def test_no_detection_writes_an_empty_list_and_the_image_unchanged(run_dir, tmp_path):
    model = mtlcv.load(_detector(run_dir, tmp_path, shift=-50.0), device="cpu")
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "im.png")
    summary = predict_files(model, [str(tmp_path / "im.png")], tmp_path / "out", fit="pad")
    record = json.loads((tmp_path / "out" / "detection" / "im.json").read_text())
    assert record == {"size": [40, 64], "detections": []}
    assert summary["images"][0]["outputs"]["detection"]["count"] == 0
    overlay = Image.open(tmp_path / "out" / "detection" / "im_overlay.png")
    assert np.array_equal(np.asarray(overlay), a)  # nothing drawn
    det = model.predict(a)["detection"]
    assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,)
    assert det["labels"].dtype == torch.long
    batch = model.predict(np.stack([a, a]))["detection"]
    assert isinstance(batch, list) and len(batch) == 2 and batch[1]["boxes"].shape == (0, 4)


def test_exported_detection_is_the_raw_map_and_decodes_with_the_task(run_dir, tmp_path):
    """NMS is not in the graph: its output decoded by the task's postprocess gives the boxes
    ``predict`` gives at the model's size."""
    model = mtlcv.load(_detector(run_dir, tmp_path, shift=6.0), device="cpu")
    report = export(model, "torchscript", tmp_path / "m.pt")
    assert report["outputs"]["detection"]["shape"] == ["batch", 15, 32, 48]
    assert "postprocess" in report["outputs"]["detection"]["is"]
    x = torch.rand(2, 3, 32, 48)
    raw = torch.jit.load(str(tmp_path / "m.pt"))(x)["detection"]
    mine = model.tasks["detection"].postprocess(raw)
    pred = model.predict(x)["detection"]
    assert len(mine[0]["boxes"]) >= 3
    for got, want in zip(mine, pred):
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- export


def _random_model(arch: str) -> Predictor:
    """An untrained ``arch`` on tiny width-8 backbones at 32x48, with a dense and an
    image-level task. The dense one is detection, whose raw map (3 classes + 5 channels) is
    exported undecoded: to a graph every dense kind's output is one more [B, C, H, W] map of
    its head (semseg, depth, normals and edges are exported with the trained run below)."""
    opts = {"detection": {"num_classes": 3}, "classification": {"num_classes": 3}}
    names = ("detection", "classification")
    tasks = {n: TASKS.create(n, **opts.get(n, {})) for n in names}
    for n, t in tasks.items():
        t.kind, t.options = n, opts.get(n, {})
    model = {"arch": arch, "backbone": {"name": "tiny", "width": 8}}
    cfg = from_dict({"tasks": list(names), "model": model})
    torch.manual_seed(0)
    net = build_model(cfg, tasks)
    meta = describe(cfg, tasks, [{"image": torch.zeros(3, 32, 48)}], net)
    return Predictor(net, tasks, meta, torch.device("cpu"))


def _run_file(fmt: str, path: Path, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    if fmt == "torchscript":
        out = torch.jit.load(str(path))(x)
        return [out[n] for n in names]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    assert session.get_inputs()[0].shape[0] == "batch"
    return [torch.from_numpy(a) for a in session.run(None, {"image": x.numpy()})]


#: architectures refused by an exporter, with the reason's words: PLE's gates average-pool
#: stage features to a size that need not divide theirs, which ONNX's adaptive pooling refuses
REFUSED: dict[tuple[str, str], str] = {("ple", "onnx"): "adaptive_avg_pool2d"}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("arch", ARCHS.names())
def test_every_architecture_exports_or_is_refused_in_one_line(arch, fmt, tmp_path):
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip(NO_ONNX)
    model = _random_model(arch)
    path = tmp_path / f"{arch}.{fmt}"
    try:
        report = export(model, fmt, path)
    except ExportError as exc:
        assert one_line(str(exc)) and arch in str(exc)
        assert (arch, fmt) in REFUSED and REFUSED[arch, fmt] in str(exc), str(exc)
        assert not path.exists()
        return
    assert (arch, fmt) not in REFUSED
    assert report["verified"] and max(report["max_abs_diff"].values()) <= 1e-4
    names = list(model.tasks)
    x = torch.rand(5, 3, 32, 48)  # a batch size neither traced nor checked by export()
    with torch.no_grad():
        ref = model.model(x)
    for n, got in zip(names, _run_file(fmt, path, x, names)):
        torch.testing.assert_close(got, ref[n], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX or not importlib.util.find_spec("onnxscript"), reason=NO_ONNX)
def test_onnx_dynamo_exporter_and_metadata(tmp_path):
    import onnx

    model = _random_model("hps")
    report = export(model, "onnx", tmp_path / "m.onnx", exporter="dynamo")
    assert report["exporter"] == "dynamo" and report["verified"]
    x = torch.rand(4, 3, 32, 48)
    with torch.no_grad():
        ref = model.model(x)
    for n, got in zip(model.tasks, _run_file("onnx", tmp_path / "m.onnx", x, list(model.tasks))):
        torch.testing.assert_close(got, ref[n], rtol=1e-4, atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    meta = json.loads(props["mtlcv"])
    assert meta["export"]["outputs"]["detection"]["shape"] == ["batch", 8, 32, 48]
    assert meta["tasks"]["classification"]["kind"] == "classification"


def test_export_refuses_a_task_that_is_not_one_tensor(tmp_path):
    model = _random_model("hps")

    class Boxes(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            out["detection"] = [{"boxes": out["detection"][i]} for i in range(len(x))]
            return out

    model.model = Boxes(model.model)
    pred = model.predict(torch.rand(2, 3, 32, 48))  # predict hands structured outputs through
    assert isinstance(pred["detection"], list)
    assert pred["detection"][1]["boxes"].shape == (8, 32, 48)
    assert pred["classification"].shape == (2,)
    with pytest.raises(ExportError, match="task 'detection' \\(detection\\) predicts a list") as e:
        export(model, "torchscript", tmp_path / "m.pt")
    assert one_line(str(e.value)) and not (tmp_path / "m.pt").exists()


def test_export_cli_and_metadata_inside_the_file(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    assert main(["export", "--run", str(run_dir), "--format", "torchscript", "--out",
                 str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "input  image: float32 ['batch', 3, 32, 48]" in text and "output semseg" in text
    assert "output detection" in text and "not in the graph" in text  # every kind, undecoded
    assert re.search(r"max \|diff\| vs PyTorch [\d.e+-]+ \(tolerance 1e-4\)", text)
    files = {"mtlcv.json": ""}
    torch.jit.load(str(out), _extra_files=files)
    assert json.loads(files["mtlcv.json"])["model"]["arch"] == "hps"
    if HAS_ONNX:  # without onnxruntime the file is written but said to be unchecked
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
        assert main(["export", "--run", str(run_dir), "--format", "onnx", "--out",
                     str(tmp_path / "m.onnx")]) == 0  # fmt: skip
        assert "not checked: onnxruntime is not installed" in capsys.readouterr().out
        assert (tmp_path / "m.onnx").is_file()
