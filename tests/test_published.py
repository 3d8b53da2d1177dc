"""The published-table configs (configs/nyuv2/published, docs/reproduce.md) never rot: every one
loads, builds its trainer (model, balancer, evaluation protocol, baselines) on tiny sizes, and a
few train a step; docs/reproduce.md lists every one with its command."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mtlcv.config import from_dict, read_yaml
from mtlcv.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = sorted((ROOT / "configs" / "nyuv2" / "published").glob("*.yaml"))
PROTOCOL_FILES = sorted((ROOT / "configs" / "nyuv2").glob("*.yaml"))
TRAINED = {"famo-code-famo", "nashmtl-code-nashmtl", "cagrad-code-cross-stitch", "stl"}


def _base(path: Path) -> dict:
    """A config file's experiment (a comparison grid's config: its base, without ``grid``)."""
    data = copy.deepcopy(read_yaml(path))
    data.pop("grid", None)
    return data


def tiny(path: Path, scenes_root: str) -> dict:
    """The config with the dataset swapped for the small scenes cache and a width-4 SegNet."""
    data = _base(path)
    data["data"] = {"name": "scenes", "root": scenes_root, "batch_size": 2,
                    "eval_batch_size": data["data"].get("eval_batch_size"),
                    "options": {"n": 48, "size": [32, 48], "seed": 0}}
    data["model"]["backbone"] = {**data["model"]["backbone"], "width": 4}
    data["train"] = {"epochs": 1, "max_steps": 1, "progress": False, "threads": 1}
    data["eval"] = {**data.get("eval", {}), "last_epochs": 1}
    return data


def test_there_is_a_config_per_published_row():
    assert len(PUBLISHED) >= 19
    names = {p.stem for p in PUBLISHED}
    for method in ("stl", "cagrad-code-cagrad", "nashmtl-code-nashmtl", "famo-code-famo",
                   "alignedmtl-code-aligned-mtl"):
        assert method in names


@pytest.mark.parametrize("path", PUBLISHED + PROTOCOL_FILES, ids=lambda p: p.stem)
def test_published_config_loads_and_builds(path, scenes_root, tmp_path):
    cfg = from_dict(_base(path))
    assert cfg.model.head == {"name": "mtan"} or "libmtl" in path.stem
    if cfg.model.backbone["name"] == "segnet":
        assert cfg.data.batch_size == 2 and cfg.optim.lr == 1e-4 and cfg.train.epochs == 200
    header = path.read_text().split("\nname:")[0]
    assert f"configs/nyuv2/{path.parent.name}/{path.name}" in header or path.parent.name == "nyuv2"
    if cfg.model.backbone["name"] != "segnet":
        return  # the ResNet-50 protocol file: loading it is the check (no tiny ResNet-50)
    trainer = Trainer(from_dict(tiny(path, scenes_root)), tmp_path / "run", log=lambda s: None)
    assert trainer.cfg.eval.protocol == cfg.eval.protocol
    if path.stem in TRAINED:
        results = trainer.fit()
        assert results["protocol"]["name"] == cfg.eval.protocol


def test_reproduce_doc_lists_every_published_config_with_its_command():
    doc = (ROOT / "docs" / "reproduce.md").read_text()
    for path in PUBLISHED:
        rel = f"configs/nyuv2/published/{path.name}"
        assert rel in doc, rel
    # every config the doc names exists
    for line in doc.splitlines():
        for word in line.replace("`", " ").split():
            if word.startswith("configs/nyuv2/published/") and word.endswith(".yaml"):
                assert (ROOT / word).is_file(), word
