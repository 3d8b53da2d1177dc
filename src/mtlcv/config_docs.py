"""Self-documenting configuration: every key's type, default and meaning, and component options.

The meanings are not written twice: they are the ``#:`` comments above each field of the config
dataclasses in :mod:`mtlcv.config` (read from the source), and component options (dataset,
backbone, head, architecture, balancer) come from their registered factories' signatures, with
a one-line meaning taken from the factory's (or its class's) ``Args:`` docstring section when it
has one. ``mtlcv config keys``, ``mtlcv config show`` and ``mtlcv config options`` print them.

Example:
    >>> docs = {k.key: k for k in config_keys()}
    >>> docs["optim.lr"].default, docs["optim.lr"].type
    (0.001, 'float')
    >>> docs["data.batch_size"].meaning
    'training batch size'
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .config import ExperimentConfig, to_dict
from .errors import ConfigError

# ---------------------------------------------------------------------- config keys


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted ``key``, ``type`` (as written), ``default`` and ``meaning``."""

    key: str
    type: str
    default: Any
    meaning: str
    section: bool = False


def _clean(text: str) -> str:
    """Docstring markup to plain text: ``x`` -> `x`, whitespace collapsed."""
    return " ".join(text.replace("``", "`").split())


@functools.cache
def field_meanings(cls: type) -> dict[str, str]:
    """``{field: meaning}`` from the ``#:`` comment lines directly above each field of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:", s)
        if m and m.group(1) in names and pending:
            out[m.group(1)] = _clean(" ".join(pending))
        pending = []
    return out


def _type_name(tp: Any) -> str:
    """``int``, ``str | None``, ``list[str]``, ``dict[str, Any]``: the annotation as written."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None  # pragma: no cover - every config field has a default


def config_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[KeyDoc]:
    """Every key of the experiment config (sections too), in the order of the dataclasses."""
    hints = typing.get_type_hints(cls)
    meanings = field_meanings(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(KeyDoc(key, "section", None, meanings.get(f.name, ""), section=True))
            out.extend(config_keys(tp, key + "."))
        else:
            out.append(KeyDoc(key, _type_name(tp), _default(f), meanings.get(f.name, "")))
    return out


# ---------------------------------------------------------------------- component options


@dataclass(frozen=True)
class Component:
    """Where a kind of registered component lives in the config."""

    kind: str
    #: the config key holding the component's name
    name_key: str
    #: the config key holding its options (a mapping; for backbone and head the same mapping)
    options_key: str
    #: factory arguments the library supplies itself, never set in the config
    fixed: tuple[str, ...]


COMPONENTS = {
    c.kind: c
    for c in (
        Component("dataset", "data.name", "data.options", ("split", "root", "augment")),
        Component("backbone", "model.backbone.name", "model.backbone", ()),
        Component("head", "model.head.name", "model.head", ("in_channels", "out_channels")),
        Component("architecture", "model.arch", "model.options", ("tasks", "backbone", "head")),
        Component("balancer", "balancer.name", "balancer.options", ("num_tasks",)),
    )
}


@dataclass(frozen=True)
class OptionDoc:
    """One option of a component: ``name``, ``type``, ``default`` and ``meaning``."""

    name: str
    type: str
    default: Any
    meaning: str
    required: bool = False


def _args_section(doc: str) -> dict[str, str]:
    """``{name: text}`` of a Google-style ``Args:`` section (continuation lines joined)."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:"))
    except StopIteration:
        return out
    indent, current = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        m = re.match(r"\s*(\*{0,2}\w+)(?: \([^)]*\))?:\s*(.*)", line)
        if width == indent and m:
            current = m.group(1).lstrip("*")
            out[current] = m.group(2)
        elif current is not None and width > indent:
            out[current] += " " + line.strip()
        else:
            break
    return {k: _clean(v) for k, v in out.items()}


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.;])(\s|$)", text)
    return m.group(1).rstrip(".;") if m else text


def _documented(factory: Callable) -> dict[str, str]:
    """Option meanings from the factory's docstring, else from the class it returns/is."""
    found = _args_section(inspect.getdoc(factory) or "")
    targets: list[Any] = []
    if not inspect.isclass(factory):
        try:
            targets.append(typing.get_type_hints(factory).get("return"))
        except Exception:  # noqa: BLE001 - an unresolvable annotation only loses the meanings
            pass
    else:
        targets.append(factory)
    for cls in targets:
        for klass in getattr(cls, "__mro__", ()):
            if klass.__module__.startswith("mtlcv"):
                for k, v in _args_section(inspect.getdoc(klass) or "").items():
                    found.setdefault(k, v)
    return {k: _first_sentence(v) for k, v in found.items()}


def component_options(kind: str, name: str) -> list[OptionDoc]:
    """The options the config may set for component ``name`` of ``kind``, from its signature."""
    from .registry import ALL

    if kind not in COMPONENTS:
        raise ConfigError(f"unknown component kind {kind!r}; valid: {', '.join(COMPONENTS)}")
    comp = COMPONENTS[kind]
    factory = ALL[kind].get(name, where=comp.name_key)
    meanings = _documented(factory)
    out = []
    for p in inspect.signature(factory).parameters.values():
        if p.name in comp.fixed or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        ann = p.annotation
        tp = "" if ann is inspect.Parameter.empty else (ann if isinstance(ann, str) else
                                                        _type_name(ann))
        required = p.default is inspect.Parameter.empty
        out.append(OptionDoc(p.name, tp, None if required else p.default,
                             meanings.get(p.name, ""), required))
    return out


def _get(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def check_component_options(cfg: ExperimentConfig) -> None:
    """Raise ConfigError for a component option its factory does not take (before building)."""
    data = to_dict(cfg)
    for kind, comp in COMPONENTS.items():
        name = _get(data, comp.name_key)
        valid = {o.name for o in component_options(kind, name)}
        given = dict(_get(data, comp.options_key) or {})
        if comp.options_key == f"{comp.name_key.rsplit('.', 1)[0]}":  # {name, **options}
            given.pop("name", None)
        for key in given:
            if key not in valid:
                raise ConfigError(
                    f"config key '{comp.options_key}.{key}': {kind} {name!r} has no option "
                    f"{key!r}; valid options: {', '.join(sorted(valid)) or '(none)'}"
                )


# ---------------------------------------------------------------------- formatting


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML flow style (``[96, 128]``, ``null``, ``{a: 1}``)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def _comment(text: str, default: str | None) -> str:
    bits = [text] if text else []
    if default is not None:
        bits.append(default)
    return " ".join(bits)


def show(cfg: ExperimentConfig, header: str = "") -> str:
    """The resolved config as commented YAML: every key's value, meaning and default.

    Each key line ends with ``# meaning [default: X]`` (``[default]`` when the value is the
    default). Under each component's options come all options its factory takes; those not
    set are commented out with their defaults. The text is itself a valid config that loads to
    ``cfg``.
    """
    data = to_dict(cfg)
    docs = {k.key: k for k in config_keys()}
    by_options = {c.options_key: c for c in COMPONENTS.values()}
    rows: list[tuple[str, str]] = []  # (yaml text, comment)

    def add(text: str, comment: str = "") -> None:
        rows.append((text, comment))

    def component_rows(key: str, mapping: dict[str, Any], indent: str) -> None:
        comp = by_options[key]
        name = _get(data, comp.name_key)
        what = f"{comp.kind} {name!r}"
        for opt in component_options(comp.kind, name):
            meaning = opt.meaning or f"option of {what}"
            kind = f"{opt.type}; " if opt.type else ""
            if opt.name in mapping:
                d = "required" if opt.required else f"default: {yaml_value(opt.default)}"
                add(f"{indent}{opt.name}: {yaml_value(mapping[opt.name])}",
                    f"{meaning} [{kind}{d}]")
            else:
                shown = "(required)" if opt.required else yaml_value(opt.default)
                add(f"{indent}# {opt.name}: {shown}", f"{meaning} [{kind}default]")

    def walk(node: dict[str, Any], prefix: str, indent: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            doc = docs.get(key)
            if doc is not None and doc.section:
                add(f"{indent}{k}:", doc.meaning)
                walk(v, key + ".", indent + "  ")
                continue
            meaning = doc.meaning if doc is not None else ""
            dflt = None
            if doc is not None:
                dflt = "[default]" if v == doc.default else f"[default: {yaml_value(doc.default)}]"
            if key in by_options:
                comp = by_options[key]
                own = {kk: vv for kk, vv in v.items() if kk != "name"}
                if comp.kind in ("backbone", "head"):
                    add(f"{indent}{k}:", _comment(meaning, dflt))
                    add(f"{indent}  name: {yaml_value(v.get('name'))}",
                        f"the {comp.kind} (mtlcv list {comp.kind})")
                    component_rows(key, own, indent + "  ")
                elif own:
                    add(f"{indent}{k}:", _comment(meaning, dflt))
                    component_rows(key, own, indent + "  ")
                else:
                    add(f"{indent}{k}: {{}}", _comment(meaning, dflt))
                    component_rows(key, own, indent + "  ")
                continue
            add(f"{indent}{k}: {yaml_value(v)}", _comment(meaning, dflt))

    walk(data, "", "")
    width = min(48, max(len(t) for t, _ in rows) + 2)
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for text, comment in rows:
        lines.append(f"{text:<{width}}# {comment}".rstrip() if comment else text)
    return "\n".join(lines) + "\n"


def keys_table(items: list[KeyDoc]) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` rows of the non-section keys, for ``config keys``."""
    return [(k.key, k.type, yaml_value(k.default), k.meaning) for k in items if not k.section]
