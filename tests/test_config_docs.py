"""Discoverable configuration: `mtlcv config show | keys | options`, meanings that cannot drift,
and a `--set data.name=...` that leaves the old dataset's options behind."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtlcv.cli import build_parser, main
from mtlcv.config import ExperimentConfig, from_dict, load, read_yaml, to_dict
from mtlcv.config_docs import (
    component_options,
    config_keys,
    field_meanings,
    show,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("options", "backbone", "head"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_config_key_is_documented_with_its_default():
    """Every field of the config dataclasses has a `#:` meaning: a new key without one fails."""
    keys = {k.key: k for k in config_keys()}
    defaults = _flat(to_dict(ExperimentConfig()))
    assert {k for k, d in keys.items() if not d.section} == set(defaults)
    for key, doc in keys.items():
        assert doc.meaning, f"config key {key!r} has no `#:` comment in mtlcv/config.py"
        if not doc.section:
            assert doc.default == defaults[key], key
    assert keys["optim.lr"].type == "float" and keys["data.root"].type == "str | None"


def test_meanings_are_read_from_the_comments_above_each_field():
    @dataclass
    class Demo:
        #: first line
        #: second line, ``quoted``
        a: int = 1
        b: int = 2  # a trailing comment is not a meaning
        #: of c
        c: str = "x"

    assert field_meanings(Demo) == {"a": "first line second line, `quoted`", "c": "of c"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_show_is_a_valid_config_that_loads_back_identically(path):
    data = read_yaml(path)
    data.pop("grid", None)  # a comparison grid's config: its base experiment
    cfg = from_dict(data)
    text = show(cfg, header=f"from {path.name}")
    assert to_dict(from_dict(yaml.safe_load(text))) == to_dict(cfg)
    # every key line carries the key's meaning and its default
    docs = {k.key: k for k in config_keys()}
    lines = text.splitlines()
    for key in ("optim.lr", "train.epochs", "data.batch_size", "balancer.name"):
        section, leaf = key.split(".")
        start = next(i for i, x in enumerate(lines) if x.startswith(f"{section}:"))
        line = next(x for x in lines[start:] if x.startswith(f"  {leaf}:"))
        assert docs[key].meaning in line and "[default" in line, line


def test_show_of_a_grid_config_prints_its_base_and_its_grid(capsys):
    from mtlcv.cli import main

    path = ROOT / "configs" / "scenes" / "seed_experiment.yaml"
    assert main(["config", "show", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    base, grid = text.split("# the comparison grid (mtlcv compare --config FILE --out DIR)")
    assert to_dict(from_dict(yaml.safe_load(base)))["model"]["arch"] == "hps"
    assert yaml.safe_load(grid)["grid"] == read_yaml(path)["grid"]


def test_show_lists_every_component_option_from_the_signatures():
    cfg = load(ROOT / "configs" / "scenes" / "mtan.yaml", ["balancer.name=cagrad"])
    text = show(cfg)
    assert re.search(r"^    reduction: 1 +# .*\[int; default: 1\]", text, re.M)  # set
    assert re.search(r"^    # width: 32 +#", text, re.M)  # backbone option left at its default
    assert re.search(r"^    # c: 0.4 +#", text, re.M)  # balancer options from cagrad's signature
    assert "# num_tasks" not in text and "# in_channels" not in text  # supplied by the library
    # the options printed are exactly the factories' keyword arguments
    import inspect

    from mtlcv.registry import BALANCERS

    params = inspect.signature(BALANCERS.get("cagrad")).parameters
    assert [o.name for o in component_options("balancer", "cagrad")] == [
        n for n in params if n != "num_tasks"
    ]
    assert {o.name: o.default for o in component_options("balancer", "cagrad")}["c"] == 0.4
    weights = component_options("balancer", "fixed")[0]
    assert weights.name == "weights" and "one non-negative weight per task" in weights.meaning


def test_config_show_cli_resolves_overrides(capsys):
    args = ["config", "show", "--config", str(ROOT / "configs/scenes/hps.yaml"),
            "--set", "optim.lr=0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    cfg = from_dict(yaml.safe_load(out))
    assert cfg.optim.lr == 0.01 and cfg.name == "scenes-hps"
    assert re.search(r"^  lr: 0.01 +# learning rate \[default: 0.001\]$", out, re.M)
    assert main(["config", "show"]) == 0  # the defaults alone
    assert to_dict(from_dict(yaml.safe_load(capsys.readouterr().out))) == to_dict(
        ExperimentConfig()
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.options.bogus=1", "data.options.bogus"),
        ("balancer.options.bogus=1", "balancer.options.bogus"),
        ("model.options.reduction=2", "model.options.reduction"),  # hps has no options
        ("model.backbone.depth=3", "model.backbone.depth"),
    ],
)
def test_config_show_rejects_unknown_component_options(override, key, capsys):
    hps = str(ROOT / "configs/scenes/hps.yaml")
    assert main(["config", "show", "--config", hps, "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"config key '{key}'" in err and "valid options" in err


def test_config_keys_and_options_cli(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^optim\.lr +float +0\.001 +learning rate$", out, re.M)
    assert main(["config", "keys", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in rows} >= {"name", "tasks", "train.threads", "baselines"}
    assert main(["config", "options", "balancer", "upgrad", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["config_key"] == "balancer.options"
    assert {o["name"]: o["default"] for o in entry["options"]} == {
        "norm_eps": 0.0001, "reg_eps": 0.0001, "mode": "param", "batched": True
    }
    assert main(["config", "options", "dataset"]) == 0
    out = capsys.readouterr().out
    assert "dataset scenes  (data.options)" in out and "  n: int = 600" in out
    assert main(["config", "options", "balancer", "nope"]) == 2


def test_train_help_points_to_the_config_keys():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert "mtlcv config keys" in train.format_help()


# ---------------------------------------------------------------------- switching datasets


def test_switching_dataset_drops_the_old_datasets_options(capsys):
    hps = ROOT / "configs" / "scenes" / "hps.yaml"
    cfg = load(hps, ["data.name=nyuv2", "data.root=/data/nyuv2"])
    assert (cfg.data.name, cfg.data.root, cfg.data.options) == ("nyuv2", "/data/nyuv2", {})
    err = capsys.readouterr().err
    assert "data.options={n: 600, size: [96, 128], seed: 0}" in err and "dropped" in err
    # options set on the same command line are the new dataset's: kept
    cfg = load(hps, ["data.name=nyuv2", "data.options.size=[288, 384]"])
    assert cfg.data.options == {"size": [288, 384]}
    capsys.readouterr()
    # the same dataset keeps its options, silently; so does any other override
    assert load(hps, ["data.name=scenes", "train.epochs=1"]).data.options["n"] == 600
    assert capsys.readouterr().err == ""


def _doc_commands(path: Path) -> list[list[str]]:
    """The arguments of the `mtlcv train ...` lines of a markdown file (continuations joined)."""
    text = path.read_text().replace("\\\n", " ")
    return [shlex.split(line)[2:] for line in re.findall(r"^(mtlcv train .*)$", text, re.M)]


def test_every_train_command_of_the_dataset_docs_resolves(capsys):
    """docs/datasets.md's commands give valid configs (checked as `config show` checks them:
    keys, types and every component option), MY.yaml being a scenes config."""
    commands = _doc_commands(ROOT / "docs" / "datasets.md")
    assert len(commands) >= 3
    for argv in commands:
        argv = ["configs/scenes/hps.yaml" if a == "MY.yaml" else a for a in argv]
        i = argv.index("--config")
        argv[i + 1] = str(ROOT / argv[i + 1])  # the docs' paths are relative to the repository
        show_args = ["config", "show", *argv]
        assert main(show_args) == 0, (argv, capsys.readouterr().err)
        capsys.readouterr()


def _fake_nyuv2(root: Path, frames: dict[str, int], h: int = 32, w: int = 48) -> None:
    """mtan's .npy layout with random but valid arrays."""
    rng = np.random.default_rng(0)
    for split, n in frames.items():
        for i in range(n):
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            arrays = {
                "image": rng.random((h, w, 3), dtype=np.float32),
                "label": rng.integers(-1, 13, (h, w)).astype(np.float32),
                "depth": (0.5 + 4 * rng.random((h, w, 1))).astype(np.float32),
                "normal": normal / np.linalg.norm(normal, axis=-1, keepdims=True),
            }
            for sub, a in arrays.items():
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                np.save(root / split / sub / f"{i}.npy", a)


def test_the_documented_nyuv2_command_trains_from_a_scenes_config(tmp_path, capsys):
    """`mtlcv train --config MY.yaml --set data.name=nyuv2 --set data.root=...` of
    docs/datasets.md, with MY.yaml = configs/scenes/hps.yaml, on a tiny folder of that layout."""
    root = tmp_path / "nyuv2"
    _fake_nyuv2(root, {"train": 4, "val": 2})
    assert main(["data", "check", str(root)]) == 0
    args = ["train", "--config", str(ROOT / "configs/scenes/hps.yaml"),
            "--set", "data.name=nyuv2", "--set", f"data.root={root}",
            "--set", "train.epochs=1", "--set", "model.backbone.width=8",
            "--set", "train.threads=1", "--set", "data.batch_size=2",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0, capsys.readouterr().err
    saved = load(tmp_path / "run" / "config.yaml")
    assert saved.data.name == "nyuv2" and saved.data.options == {}


def test_the_documented_fixture_check_passes(capsys):
    from conftest import FIXTURE

    lines = re.findall(r"^mtlcv data check (\S+)$", (ROOT / "docs/datasets.md").read_text(), re.M)
    assert "../shared/data/nyuv2-fixture" in lines
    if not FIXTURE.is_dir():
        pytest.skip(f"real NYUv2 fixture not found at {FIXTURE}")
    # the docs' path is relative to the repository
    assert (ROOT / "../shared/data/nyuv2-fixture").resolve() == FIXTURE.resolve()
    assert main(["data", "check", str(FIXTURE)]) == 0
    assert "OK (nyuv2-fixture, 28 frames" in capsys.readouterr().out
