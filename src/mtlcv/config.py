"""Typed experiment configuration: YAML files plus ``--set a.b=c`` overrides, strictly validated.

An experiment is an :class:`ExperimentConfig`. Loading goes YAML -> nested dict -> overrides ->
dataclasses; every unknown key or wrongly typed value raises a :class:`~mtlcv.errors.ConfigError`
whose one-line message names the key, what was given and what is allowed.

Components that come from a registry (dataset, backbone, head, architecture, balancer) are
written as a ``name`` plus that component's own options; their options are checked against the
factory's signature when the experiment is built (see :mod:`mtlcv.registry`).

Example:
    >>> cfg = from_dict({"tasks": ["semseg", "depth"], "optim": {"lr": 0.01}})
    >>> cfg.optim.lr, cfg.model.arch
    (0.01, 'hps')
    >>> apply_overrides(to_dict(cfg), ["train.epochs=3"])["train"]["epochs"]
    3
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    #: dataset (mtlcv list dataset); its own options go in data.options
    name: str = "scenes"
    #: dataset location (cache folder for scenes, dataset root/file for NYUv2)
    root: str | None = None
    #: training batch size
    batch_size: int = 8
    #: batch size for val/test (None = batch_size)
    eval_batch_size: int | None = None
    #: DataLoader worker processes (0 = load in the main process)
    num_workers: int = 0
    #: joint augmentation of the training split (the dataset's published protocol)
    augment: bool = False
    #: the dataset's own options, e.g. ``{size: [96, 128], n: 600}`` for scenes
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    #: architecture (mtlcv list architecture); its own options go in model.options
    arch: str = "hps"
    #: ``{name: ..., <backbone options>}``, e.g. ``{name: resnet18, dilated: true, weights: PATH}``
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "tiny"})
    #: ``{name: ..., <head options>}``
    head: dict[str, Any] = field(default_factory=lambda: {"name": "light"})
    #: the architecture's own options, e.g. ``{reduction: 1}`` for mtan
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    #: optimizer: adam, adamw or sgd
    name: str = "adam"
    #: learning rate
    lr: float = 1e-3
    #: weight decay (an L2 penalty for adam and sgd, decoupled for adamw)
    weight_decay: float = 0.0
    #: SGD momentum (ignored by Adam)
    momentum: float = 0.9


@dataclass
class ScheduleConfig:
    #: none, step (StepLR) or cosine (CosineAnnealingLR over all epochs)
    name: str = "none"
    #: step schedule: epochs between learning-rate decays
    step_size: int = 100
    #: step schedule: learning-rate factor at each decay
    gamma: float = 0.5


@dataclass
class BalancerConfig:
    #: task balancing method (mtlcv list balancer)
    name: str = "fixed"
    #: the balancer's own options, e.g. ``{weights: [1, 1, 1]}`` for fixed
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    #: training epochs
    epochs: int = 10
    #: auto (cuda when available, else cpu), cpu, cuda, cuda:N
    device: str = "auto"
    #: stop each training epoch after this many steps (None = the whole split); for smoke runs
    max_steps: int | None = None
    #: show a progress bar (off automatically when stdout is not a terminal)
    progress: bool = True
    #: CPU threads for PyTorch's intra-op parallelism (None = PyTorch's default, one per core)
    threads: int | None = None
    #: every N training steps, log the gradient conflict and the TAG task affinity of the
    #: shared parameters to ``gradients.jsonl`` (None = off; see mtlcv.engine.gradient_log)
    log_gradients_every: int | None = None
    #: also write ``last.pt`` every N optimizer steps (None = at the end of every epoch only);
    #: a resume then continues mid-epoch exactly
    checkpoint_every: int | None = None
    #: a NaN or infinite loss: ``stop`` (one line naming task and step; the last checkpoint is
    #: kept) or ``skip`` (warn, naming task and step, and leave that step out)
    on_nonfinite: str = "stop"
    #: with several processes (torchrun): batch norm over the global batch (exact; see
    #: docs/distributed.md) instead of each process's own samples
    sync_bn: bool = True
    #: mixed precision: off, bf16 (autocast, no scaling) or fp16 (autocast and a dynamic loss
    #: scale; per-task gradients are unscaled before the balancer aggregates them, and a step
    #: whose gradients overflow is skipped, for every method alike); see docs/performance.md
    amp: str = "off"
    #: keep the model's weights and activations in channels-last memory layout (for GPUs'
    #: tensor cores; no gain measured on CPU, so off by default: docs/performance.md)
    channels_last: bool = False
    #: compile the model's forward pass with torch.compile (off by default: no gain measured on
    #: CPU, and a minute of compilation before the first step: docs/performance.md)
    compile: bool = False


@dataclass
class EvalConfig:
    """How val/test numbers are computed (see :mod:`mtlcv.engine.protocol`).

    ``exact`` (default): every metric over the whole split, test = the best-on-val checkpoint.
    ``published``: the protocol of the SegNet-MTAN papers (MTAN, CAGrad, Nash-MTL, FAMO): depth
    and normals metrics averaged over evaluation batches (``data.eval_batch_size``, 2 there),
    segmentation from the split's confusion matrix, and test = the mean of the test metrics of
    the last ``last_epochs`` epochs. A Δm between numbers of different protocols is refused unless
    ``allow_protocol_mismatch`` is true.
    """

    #: exact (every metric over the whole split, test = the best-on-val checkpoint) or published
    #: (the SegNet-MTAN papers' batch-averaged depth/normals, test = mean of the last epochs)
    protocol: str = "exact"
    #: epochs whose test metrics the published protocol averages (10 in the papers)
    last_epochs: int = 10
    #: compute Δm against baselines measured under another protocol (not comparable)
    allow_protocol_mismatch: bool = False


@dataclass
class ExperimentConfig:
    #: run name; the default run directory is runs/NAME-TIMESTAMP
    name: str = "experiment"
    #: seed of every random number generator (data order, initialisation, augmentation)
    seed: int = 0
    #: the tasks to learn, each a target the dataset provides (mtlcv list task)
    tasks: list[str] = field(default_factory=lambda: ["semseg", "depth", "normals"])
    #: the dataset and its loaders
    data: DataConfig = field(default_factory=DataConfig)
    #: the network: architecture, backbone, heads
    model: ModelConfig = field(default_factory=ModelConfig)
    #: the optimizer
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: the learning-rate schedule (stepped once per epoch)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    #: how the per-task losses become one update
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    #: the training loop
    train: TrainConfig = field(default_factory=TrainConfig)
    #: how val and test numbers are computed (the evaluation protocol)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: single-task baselines for Δm: a run directory, a results.json, or a named published
    #: baseline (see ``mtlcv.analysis.baselines``); None = select the best epoch by mean rank
    baselines: str | None = None
    #: auxiliary tasks (a subset of ``tasks``): trained and balanced like the others, left out
    #: of model selection and Δm, shown apart in tables; PAD-Net and MTI-Net predict them only
    #: at their intermediate stage
    aux_tasks: list[str] = field(default_factory=list)


OPTIMIZERS = ("adam", "sgd", "adamw")
PROTOCOLS = ("exact", "published")
SCHEDULES = ("none", "step", "cosine")
#: values of ``train.amp``
AMP_MODES = ("off", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip")
#: the dataset factory's own arguments, set by ``data.root``, the split and ``data.augment``
DATASET_ARGUMENTS = ("root", "split", "augment")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        _bad(key, value, _type_name(tp))
    if tp is type(None):
        if value is None:
            return None
        _bad(key, value, "null")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _bad(key, value, f"a list of {_type_name(typing.get_args(tp)[0])}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _bad(key, value, "a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _bad(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _bad(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _bad(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _bad(key, value, "a string")
    raise AssertionError(f"unsupported annotation {tp!r} for {key}")  # pragma: no cover


def _bad(key: str, value: Any, expected: str) -> None:
    raise ConfigError(
        f"config key {key!r}: got {value!r} ({type(value).__name__}), expected {expected}"
    )


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        _bad(prefix or "(top level)", data, "a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            if full == "grid":  # a comparison grid's config (configs/*/seed_experiment.yaml)
                raise ConfigError("config key 'grid' describes a comparison grid: run it with "
                                  "`mtlcv compare --config FILE --out DIR`")
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Value checks that types alone cannot express."""
    if not cfg.tasks:
        raise ConfigError("config key 'tasks': got an empty list, expected at least one task")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ConfigError(f"config key 'tasks': got duplicates in {cfg.tasks}")
    for t in cfg.aux_tasks:
        if t not in cfg.tasks:
            raise ConfigError(
                f"config key 'aux_tasks': {t!r} is not one of the tasks ({', '.join(cfg.tasks)})"
            )
    if len(set(cfg.aux_tasks)) == len(cfg.tasks):
        raise ConfigError(
            "config key 'aux_tasks': every task is auxiliary; at least one main task is needed "
            "(model selection and Δm use the main tasks)"
        )
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(
            f"config key 'optim.name': got {cfg.optim.name!r}, "
            f"expected one of {', '.join(OPTIMIZERS)}"
        )
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(
            f"config key 'schedule.name': got {cfg.schedule.name!r}, "
            f"expected one of {', '.join(SCHEDULES)}"
        )
    if cfg.eval.protocol not in PROTOCOLS:
        raise ConfigError(
            f"config key 'eval.protocol': got {cfg.eval.protocol!r}, "
            f"expected one of {', '.join(PROTOCOLS)}"
        )
    positive = {
        "eval.last_epochs": cfg.eval.last_epochs,
        "data.batch_size": cfg.data.batch_size,
        "train.epochs": cfg.train.epochs,
        "schedule.step_size": cfg.schedule.step_size,
    }
    if cfg.data.eval_batch_size is not None:
        positive["data.eval_batch_size"] = cfg.data.eval_batch_size
    if cfg.train.max_steps is not None:
        positive["train.max_steps"] = cfg.train.max_steps
    if cfg.train.threads is not None:
        positive["train.threads"] = cfg.train.threads
    if cfg.train.log_gradients_every is not None:
        positive["train.log_gradients_every"] = cfg.train.log_gradients_every
    if cfg.train.checkpoint_every is not None:
        positive["train.checkpoint_every"] = cfg.train.checkpoint_every
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key {key!r}: got {value}, expected a positive integer")
    if not 0 <= cfg.seed < 2**64:
        raise ConfigError(f"config key 'seed': got {cfg.seed}, expected an integer in [0, 2^64)")
    numbers = {
        # key: (value, low, low allowed, high (excluded) or None, what is expected)
        "optim.lr": (cfg.optim.lr, 0.0, False, None, "a positive number"),
        "optim.weight_decay": (cfg.optim.weight_decay, 0.0, True, None, "a number >= 0"),
        "optim.momentum": (cfg.optim.momentum, 0.0, True, 1.0, "a number in [0, 1)"),
        # a negative factor would turn the steps into gradient ascent
        "schedule.gamma": (cfg.schedule.gamma, 0.0, False, None, "a positive number"),
    }
    for key, (value, low, low_ok, high, want) in numbers.items():
        ok = math.isfinite(value) and (value > low or (low_ok and value == low))
        if not ok or (high is not None and value >= high):
            raise ConfigError(f"config key {key!r}: got {value}, expected {want}")
    if cfg.data.num_workers < 0:
        raise ConfigError(
            f"config key 'data.num_workers': got {cfg.data.num_workers}, expected >= 0"
        )
    if cfg.train.amp not in AMP_MODES:
        raise ConfigError(
            f"config key 'train.amp': got {cfg.train.amp!r}, expected one of "
            f"{', '.join(AMP_MODES)}"
        )
    if cfg.train.on_nonfinite not in ON_NONFINITE:
        raise ConfigError(
            f"config key 'train.on_nonfinite': got {cfg.train.on_nonfinite!r}, "
            f"expected one of {', '.join(ON_NONFINITE)}"
        )
    clash = [k for k in DATASET_ARGUMENTS if k in cfg.data.options]
    if clash:
        raise ConfigError(
            f"config key 'data.options.{clash[0]}': set by mtlcv itself (use data.root, and "
            "data.augment; the split is chosen by the trainer); remove it from data.options"
        )
    for key in ("backbone", "head"):
        comp = getattr(cfg.model, key)
        if not isinstance(comp.get("name"), str):
            raise ConfigError(
                f"config key 'model.{key}': got {comp!r}, expected a mapping with a 'name' string"
            )
    return cfg


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    return validate(_build(ExperimentConfig, data, ""))


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.001")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=5"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself (e.g. a name with a colon)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(
            f"--set {item!r}: the value cannot be read ({type(exc).__name__})"
        ) from None
    # YAML 1.1 reads "1e-3" as a string; accept the usual float spellings
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``a.b=c`` override applied (creating mappings)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"--set {item!r}: {'.'.join(path[: i + 1])!r} is {nxt!r}, not a mapping"
                )
            node = nxt
        node[path[-1]] = value
    return data


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (also at line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: let PyYAML report it
            break
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, what: str) -> Any:
    """YAML ``text`` (safe, duplicate keys refused); ConfigError naming ``what`` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        detail = f": {problem}" if problem else ""
        raise ConfigError(f"{what} is not valid YAML{where}{detail}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{what} is not valid YAML ({type(exc).__name__}: {exc})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"config file {str(path)!r} cannot be read ({exc.strerror or type(exc).__name__})"
        ) from None
    data = parse_yaml(text, f"config file {str(path)!r}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return data


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()


#: the keys of ``data`` that belong to one particular dataset (its location and own options)
DATASET_SPECIFIC = ("root", "options")


def switch_dataset(
    data: dict[str, Any], overrides: list[str], source: str = "the config"
) -> dict[str, Any]:
    """Drop ``data.root`` and ``data.options`` from ``data`` when ``overrides`` change
    ``data.name`` to another dataset: they described the old dataset (a scenes cache's ``n``
    and ``seed`` mean nothing to NYUv2, and its ``size`` would silently resize it). Options the
    overrides set themselves are applied afterwards, so they are kept. A note on stderr names
    what was dropped. Returns ``data`` unchanged, or a copy without those keys."""
    names = [v for p, v in map(parse_override, overrides) if p == ["data", "name"]]
    section = data.get("data")
    if not names or not isinstance(section, dict):
        return data
    old = section.get("name", DataConfig.name)
    dropped = [k for k in DATASET_SPECIFIC if section.get(k) not in (None, {})]
    if names[-1] == old or not dropped:
        return data
    data = copy.deepcopy(data)
    for k in dropped:
        del data["data"][k]
    what = ", ".join(f"data.{k}={_flow(section[k])}"
                     for k in dropped)
    print(
        f"mtlcv: note: --set data.name={names[-1]} replaces dataset {old!r} of {source}; "
        f"its {what} no longer apply and were dropped (set them with --set data.KEY=...)",
        file=sys.stderr,
    )
    return data


def load_dict(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The config mapping of ``path`` (or the defaults) with ``overrides``, not yet validated.

    An override that switches ``data.name`` to another dataset drops the file's dataset-specific
    keys first (:func:`switch_dataset`).
    """
    overrides = list(overrides or [])
    data = read_yaml(path) if path is not None else {}
    if path is not None:
        data = switch_dataset(data, overrides, repr(str(path)))
    return apply_overrides(data, overrides)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read ``path`` (or start from the defaults), apply ``overrides`` and validate."""
    return from_dict(load_dict(path, overrides))


def dump(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
