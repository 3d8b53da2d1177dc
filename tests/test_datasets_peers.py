"""The benchmarks beyond NYUv2: Cityscapes (preprocessed and official folders), PASCAL-Context
(the survey's PASCAL_MT), Office-31 / Office-Home. Each loader reads a small fixture the test
writes in the dataset's real on-disk layout; values are checked against the published rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlcv.data.check import check_dataset, detect, main_check
from mtlcv.errors import ConfigError, DataError
from mtlcv.registry import DATASETS, TASKS

H, W = 16, 32


def save_png(path: Path, a: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode=mode).save(path)


# ---------------------------------------------------------------- Cityscapes, preprocessed
def write_cityscapes_npy(root: Path, label: str = "label_7", n: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            d = root / split
            for sub in ("image", label, "depth"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            np.save(d / "image" / f"{i}.npy", rng.random((H, W, 3)).astype(np.float32))
            lab = rng.integers(-1, 7, (H, W)).astype(np.float32)
            np.save(d / label / f"{i}.npy", lab)
            dep = rng.random((H, W, 1)).astype(np.float32) * 0.1
            dep[0, 0] = 0
            np.save(d / "depth" / f"{i}.npy", dep)


def test_cityscapes_preprocessed_release(tmp_path):
    write_cityscapes_npy(tmp_path)
    ds = DATASETS.create("cityscapes", split="train", root=str(tmp_path))
    assert len(ds) == 2 and ds.targets == ("semseg", "depth")
    s = ds[0]
    assert s["image"].shape == (3, H, W) and s["semseg"].dtype == torch.long
    raw = np.load(tmp_path / "train" / "label_7" / "0.npy")
    assert torch.equal(s["semseg"] == 255, torch.from_numpy(raw == -1))  # -1 -> ignore
    assert s["depth"].shape == (1, H, W) and float(s["depth"][0, 0, 0]) == 0
    assert len(DATASETS.create("cityscapes", split="test", root=str(tmp_path))) == 2
    assert ds.task_options == {"semseg": {"num_classes": 7}}
    # LibMTL's copy names the 7-class folder label/
    (tmp_path / "train" / "label_7").rename(tmp_path / "train" / "label")
    assert len(DATASETS.create("cityscapes", split="train", root=str(tmp_path))) == 2
    with pytest.raises(DataError, match="label_19"):
        DATASETS.create("cityscapes", split="train", root=str(tmp_path), num_classes=19)
    with pytest.raises(ConfigError, match="num_classes"):
        DATASETS.create("cityscapes", split="train", root=str(tmp_path), num_classes=8)


def test_cityscapes_data_check_names_the_bad_file(tmp_path, capsys):
    write_cityscapes_npy(tmp_path)
    assert detect(tmp_path) == "cityscapes"
    assert main_check(tmp_path) == 0
    bad = tmp_path / "val" / "label_7" / "1.npy"
    np.save(bad, np.full((H, W), 9.0, np.float32))
    problems = check_dataset(tmp_path)
    assert len(problems) == 1 and str(bad) in problems[0] and "label id 9" in problems[0]
    assert main_check(tmp_path) == 2
    assert "1 problem" in capsys.readouterr().out


# ---------------------------------------------------------------- Cityscapes, official
def write_cityscapes_official(root: Path) -> dict:
    rng = np.random.default_rng(1)
    info = {}
    for split, city in (("train", "aachen"), ("val", "lindau")):
        for k in range(2):
            stem = f"{city}/{city}_{k:06d}_000019"
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            save_png(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", img)
            ids = np.zeros((H, W), np.uint8)
            ids[:, :8] = 7      # road: train id 0, category flat
            ids[:, 8:16] = 26   # car: train id 13, category vehicle
            ids[:, 16:24] = 24  # person: train id 11, category human
            save_png(root / "gtFine" / split / f"{stem}_gtFine_labelIds.png", ids)
            disp = np.full((H, W), 257, np.uint16)  # (257 - 1) / 256 = 1 pixel
            disp[:, -4:] = 0  # invalid
            save_png(root / "disparity" / split / f"{stem}_disparity.png", disp)
            cam = root / "camera" / split / f"{stem}_camera.json"
            cam.parent.mkdir(parents=True, exist_ok=True)
            cam.write_text(json.dumps({"extrinsic": {"baseline": 0.2}, "intrinsic": {"fx": 2000}}))
            info[split] = stem
    return info


@pytest.mark.parametrize("num_classes,want", [(19, (0, 13, 11, 255)), (7, (0, 6, 5, 255))])
def test_cityscapes_official_folders(tmp_path, num_classes, want):
    write_cityscapes_official(tmp_path)
    ds = DATASETS.create("cityscapes-official", split="train", root=str(tmp_path), size=None,
                         num_classes=num_classes)
    s = ds[0]
    seg = s["semseg"]
    assert [int(seg[0, c]) for c in (0, 8, 16, 24)] == list(want)  # labelId 0 -> ignore
    assert float(s["depth"][0, 0, 0]) == pytest.approx(1.0) and float(s["depth"][0, 0, -1]) == 0
    metres = DATASETS.create("cityscapes-official", split="test", root=str(tmp_path),
                             depth="metres", size=[8, 16])
    s = metres[0]
    assert s["image"].shape == (3, 8, 16)
    assert float(s["depth"][0, 0, 0]) == pytest.approx(0.2 * 2000 / 1.0)
    assert detect(tmp_path) == "cityscapes-official" and check_dataset(tmp_path) == []


# ---------------------------------------------------------------- PASCAL-Context
def write_pascal(root: Path) -> None:
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    names = {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003"]}
    for split, ids in names.items():
        lst = root / "ImageSets" / "Context" / f"{split}.txt"
        lst.parent.mkdir(parents=True, exist_ok=True)
        lst.write_text("\n".join(ids) + "\n")
    for n in sum(names.values(), []):
        (root / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{n}.jpg")
        sem = np.zeros((H, W), np.uint8)
        sem[:, W // 2:] = 15  # person
        sem[0, 0] = 255
        save_png(root / "semseg" / "pascal-context" / f"{n}.png", sem)
        labels = np.full((H, W), 7, np.uint16)  # 7: not an NYU class
        labels[:, W // 2:] = 18  # 18 (bed) is shared with NYUv2
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        sio.savemat(root / "pascal-context" / "trainval" / f"{n}.mat", {"LabelMap": labels})
        sal = np.zeros((H, W), np.uint8)
        sal[4:8, 4:8] = 200
        sal[8:10, 4:8] = 100  # below 0.5
        save_png(root / "sal_distill" / f"{n}.png", sal)
        nrm = np.zeros((H, W, 3), np.uint8)
        nrm[...] = (128, 128, 255)  # ~ (0, 0, 1)
        save_png(root / "normals_distill" / f"{n}.png", nrm)
        # PASCAL-Part: one person (class 15) with a head and a torso; a cat without parts
        head = np.zeros((H, W), np.uint8)
        head[0:4, 20:24] = 1
        torso = np.zeros((H, W), np.uint8)
        torso[4:10, 20:24] = 1
        part = np.dtype([("part_name", "O"), ("mask", "O")])
        parts = np.array([[("head", head), ("torso", torso)]], dtype=part)
        obj = np.dtype([("class", "O"), ("classIndex", "O"), ("mask", "O"), ("parts", "O")])
        person = n != "2008_000002"
        objects = np.array([[("person" if person else "cat", 15 if person else 8, head | torso,
                              parts if person else np.zeros((0, 0)))]], dtype=obj)
        anno = np.array([[(n, objects)]], dtype=[("imname", "O"), ("objects", "O")])
        (root / "human_parts").mkdir(exist_ok=True)
        sio.savemat(root / "human_parts" / f"{n}.mat", {"anno": anno})


def test_pascal_context_targets_follow_the_survey(tmp_path):
    write_pascal(tmp_path)
    ds = DATASETS.create("pascal-context", split="train", root=str(tmp_path))
    assert ds.task_kinds == {"human_parts": "semseg"}
    s = ds[0]
    assert int(s["semseg"][0, 0]) == 255 and int(s["semseg"][0, -1]) == 15
    hp = s["human_parts"]
    assert int(hp[0, 20]) == 1 and int(hp[5, 21]) == 2 and int(hp[12, 0]) == 0  # head, torso, bg
    assert (ds[1]["human_parts"] == 255).all()  # no person with parts: not scored
    sal = s["saliency"][0]
    assert sal[4:8, 4:8].eq(1).all() and sal[8:10, 4:8].eq(0).all()
    n = s["normals"]
    assert (n[:, :, : W // 2] == 0).all()  # class 7 is not an NYUv2 class: no normal there
    torch.testing.assert_close(n[:, 0, -1].norm(), torch.tensor(1.0))
    e = s["edges"][0]
    assert e[:, W // 2 - 1 : W // 2 + 1].eq(1).all() and e[:, :4].eq(0).all()
    assert len(DATASETS.create("pascal-context", split="val", root=str(tmp_path))) == 1
    assert detect(tmp_path) == "pascal-context" and check_dataset(tmp_path) == []
    (tmp_path / "sal_distill" / "2008_000003.png").unlink()
    assert any("2008_000003.png: file not found" in p for p in check_dataset(tmp_path))


def test_saliency_metric_is_the_surveys_per_image_maxf():
    from mtlcv.tasks.saliency import THRESHOLDS

    task = TASKS.create("saliency")
    g = torch.Generator().manual_seed(3)
    preds = [torch.randn(2, 1, 6, 7, generator=g) for _ in range(3)]
    gts = [(torch.rand(2, 1, 6, 7, generator=g) > 0.6).float() for _ in range(3)]
    gts[0][0, 0, 0, :3] = 255
    m = task.new_metric()
    for p, t in zip(preds, gts):
        m.update(p, t)
    got = m.compute()
    P, R, J = [], [], []
    for p, t in zip(preds, gts):
        for b in range(2):
            prob, gt = torch.sigmoid(p[b, 0]).numpy(), t[b, 0].numpy()
            valid = gt != 255
            rows = []
            for th in THRESHOLDS.numpy():
                pr, g1 = (prob > th) & valid, (gt == 1) & valid
                tp, fp, fn = (pr & g1).sum(), (pr & ~g1).sum(), (~pr & g1).sum()
                rows.append((tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12),
                             tp / (tp + fp + fn) if tp + fp + fn else 1.0))
            P.append([r[0] for r in rows])
            R.append([r[1] for r in rows])
            J.append([r[2] for r in rows])
    P, R, J = (np.mean(np.array(x), 0) for x in (P, R, J))
    assert got["maxF"] == pytest.approx(100 * (2 * P * R / (P + R + 1e-12)).max(), rel=1e-9)
    assert got["miou"] == pytest.approx(100 * J.max(), rel=1e-9)
    assert task.higher_is_better == {"maxF": True, "miou": True}


# ---------------------------------------------------------------- Office
def write_office(root: Path, dataset: str = "office-31", per_class: int = 5) -> list[str]:
    domains = {"office-31": ["amazon", "dslr", "webcam"],
               "office-home": ["Art", "Clipart", "Product", "Real_World"]}[dataset]
    rng = np.random.default_rng(4)
    for k, d in enumerate(domains):
        base = root / d / "images" if dataset == "office-31" else root / d
        for c in ("back_pack", "bike", "calculator"):
            (base / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class + 2 * k):  # domains of different sizes
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
                    base / c / f"frame_{i:04d}.jpg")
    return domains


def test_office_domains_are_tasks_with_ignored_other_labels(tmp_path):
    domains = write_office(tmp_path)
    ds = DATASETS.create("office-31", split="train", root=str(tmp_path), size=[8, 8],
                         balance=False)
    assert ds.targets == tuple(domains)
    assert ds.task_kinds == {d: "classification" for d in domains}
    assert ds.task_options["dslr"] == {"num_classes": 3}
    # 60/20/20 per domain and class: 5, 7, 9 images per class -> 3, 4, 5 training images
    counts = {d: sum(1 for _, t, _ in ds.items if domains[t] == d) for d in domains}
    assert counts == {"amazon": 9, "dslr": 12, "webcam": 15}
    s = ds[0]
    assert s["image"].shape == (3, 8, 8)
    labelled = [d for d in domains if int(s[d]) != 255]
    assert labelled == ["amazon"] and int(s["amazon"]) == 0
    # the splits partition each domain
    files = [set(str(p) for p, _, _ in DATASETS.create(
        "office-31", split=sp, root=str(tmp_path), balance=False).items) for sp in
        ("train", "val", "test")]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert sum(map(len, files)) == 3 * (5 + 7 + 9)
    # balance: every domain as many training images as the largest
    bal = DATASETS.create("office-31", split="train", root=str(tmp_path))
    assert len(bal) == 3 * 15
    assert detect(tmp_path) == "office-31" and check_dataset(tmp_path) == []


def test_office_reads_libmtl_split_lists(tmp_path):
    write_office(tmp_path, "office-home", per_class=2)
    lists = tmp_path / "data_txt"
    lists.mkdir()
    for d in ("Art", "Clipart", "Product", "Real_World"):
        for sp in ("train", "val", "test"):
            (lists / f"{d}_{sp}.txt").write_text(f"{d}/bike/frame_0001.jpg 1\n")
    ds = DATASETS.create("office-home", split="val", root=str(tmp_path), splits=str(lists))
    assert len(ds) == 4 and int(ds[1]["Clipart"]) == 1
    (lists / "Art_test.txt").write_text("Art/bike/frame_0001.jpg 7\n")
    with pytest.raises(DataError, match="Art_test.txt line 1: class id 7"):
        DATASETS.create("office-home", split="test", root=str(tmp_path), splits=str(lists))
    with pytest.raises(ConfigError, match="unknown domain"):
        DATASETS.create("office-home", root=str(tmp_path), domains=["amazon"])


def test_office_trains_through_the_trainer(tmp_path):
    from mtlcv.config import from_dict
    from mtlcv.engine.trainer import train

    write_office(tmp_path / "data")
    cfg = {
        "name": "office", "seed": 0, "tasks": ["amazon", "dslr", "webcam"],
        "data": {"name": "office-31", "root": str(tmp_path / "data"), "batch_size": 8,
                 "options": {"size": [16, 16]}},
        "model": {"arch": "hps", "backbone": {"name": "tiny", "width": 4},
                  "head": {"name": "light"}},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 1, "progress": False},
    }
    res = train(from_dict(cfg), tmp_path / "run", log=lambda s: None)
    assert set(res["test"]) == {"amazon", "dslr", "webcam"}
    assert all(0 <= m["accuracy"] <= 100 for m in res["test"].values())
    assert res["higher_is_better"]["dslr"] == {"accuracy": True}


@pytest.mark.parametrize("name", [
    "cityscapes/segnet_mtan.yaml", "cityscapes/libmtl_resnet50_hps.yaml",
    "pascal/survey_resnet18_hps.yaml", "office/libmtl_office31.yaml",
])
def test_published_protocol_configs_build(name):
    from mtlcv.config import load
    from mtlcv.data.pascal_context import PascalContext
    from mtlcv.models import build_model

    cfg = load(Path(__file__).resolve().parents[1] / "configs" / name)
    kinds = {"human_parts": "semseg", **{d: "classification" for d in ("amazon", "dslr", "webcam")}}
    opts = {**PascalContext.task_options,
            **{d: {"num_classes": 31} for d in kinds if d != "human_parts"}}
    if cfg.data.name.startswith("cityscapes"):
        opts = {"semseg": {"num_classes": 7}}
    tasks = {t: TASKS.create(kinds.get(t, t), **opts.get(t, {})) for t in cfg.tasks}
    backbone = {"name": "tiny", "width": 4} if cfg.model.backbone["name"] != "segnet" else {
        "name": "segnet", "width": 4}
    model = build_model(cfg.model.arch, tasks, backbone, cfg.model.head, cfg.model.options)
    assert list(model(torch.rand(2, 3, 32, 32))) == cfg.tasks
    if cfg.baselines:
        from mtlcv.analysis.baselines import get_baseline

        assert set(get_baseline(cfg.baselines)) == set(cfg.tasks)
