"""The strict config validator and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlcv.config import apply_overrides, load, to_dict
from mtlcv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load(
        None,
        [
            "optim.lr=1e-4",
            "train.epochs=3",
            "model.backbone.name=resnet18",
            "data.options.size=[32, 48]",
            "tasks=[depth]",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 3 and cfg.tasks == ["depth"]
    assert cfg.model.backbone == {"name": "resnet18"}
    assert cfg.data.options["size"] == [32, 48]


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lrr=1", r"unknown config key 'optim.lrr'; valid keys here: name, lr"),
        ("bogus=1", r"unknown config key 'bogus'"),
        ("train.epochs=two", r"'train.epochs': got 'two' \(str\), expected an integer"),
        ("train.epochs=1.5", r"'train.epochs': got 1.5 \(float\), expected an integer"),
        ("train.progress=3", r"'train.progress': got 3 \(int\), expected true or false"),
        ("tasks=depth", r"'tasks': got 'depth' \(str\), expected a list of str"),
        ("optim.name=rmsprop", r"'optim.name': got 'rmsprop', expected one of adam, sgd"),
        ("optim.lr=0", r"'optim.lr': got 0.0, expected a positive number"),
        ("data.batch_size=0", r"'data.batch_size': got 0, expected a positive integer"),
        ("optim=3", r"'optim': got 3 \(int\), expected a mapping"),
        ("tasks=[]", r"'tasks': got an empty list"),
    ],
)
def test_bad_values_name_key_value_and_expectation(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load(None, [override])
    assert "\n" not in str(err.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"tasks": ["depth"]}, ["tasks.x=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml' is not valid YAML at line"):
        load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load(lst)


def test_round_trip_through_yaml(tmp_path):
    from mtlcv.config import dump

    cfg = load(None, ["train.epochs=7", "balancer.options={weights: [1, 2, 3]}"])
    dump(cfg, tmp_path / "c.yaml")
    assert to_dict(load(tmp_path / "c.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("arch", ["stl", "hps"])
def test_shipped_scenes_configs_match_the_demo(arch):
    from mtlcv.demo import demo_configs

    shipped = to_dict(load(ROOT / "configs" / "scenes" / f"{arch}.yaml"))
    demo = to_dict(demo_configs()[arch])
    shipped.pop("name"), demo.pop("name")
    assert shipped == demo


def test_every_shipped_config_is_valid():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files
    from mtlcv.config import from_dict, read_yaml
    from mtlcv.data.office import DOMAINS
    from mtlcv.data.pascal_context import PascalContext
    from mtlcv.engine.experiment import build_dataset
    from mtlcv.engine.grid import grid_section
    from mtlcv.registry import ARCHS, BACKBONES, BALANCERS, DATASETS, HEADS, TASKS

    # task names a dataset declares itself (task_kinds), besides the registered task kinds
    declared = {**{k: set(v) for k, v in DOMAINS.items()},
                "pascal-context": set(PascalContext.task_kinds)}
    for f in files:
        data = read_yaml(f)  # a comparison grid's config holds its grid in a `grid:` section
        grid_section(data.pop("grid", None), f)
        cfg = from_dict(data)
        for t in cfg.tasks:
            if t in TASKS or t in declared.get(cfg.data.name, ()):
                continue
            # a task the dataset names itself, with its kind (task_kinds)
            kinds = getattr(build_dataset(cfg, "val"), "task_kinds", {})
            assert kinds.get(t) in TASKS, (f, t)
        assert cfg.data.name in DATASETS and cfg.model.arch in ARCHS, f
        assert cfg.model.backbone["name"] in BACKBONES and cfg.model.head["name"] in HEADS, f
        assert cfg.balancer.name in BALANCERS, f
