"""One name -> factory mechanism for tasks, datasets, backbones, heads, architectures and balancers.

Inspired by timm's ``create_model``: every component registers a factory under a name, and
``REGISTRY.create(name, **options)`` builds it. Unknown names and unknown options raise a
:class:`~mtlcv.errors.ConfigError` that lists the valid choices, so a typo in a config file
becomes one readable line instead of a traceback.

Example:
    >>> from mtlcv.registry import Registry
    >>> colors = Registry("color")
    >>> @colors.register("red", help="the colour red")
    ... def make_red(shade: int = 1):
    ...     return ("red", shade)
    >>> colors.create("red", shade=2)
    ('red', 2)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    help: str


class Registry:
    """A named collection of factories of one kind (e.g. ``"balancer"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, help: str | None = None) -> Callable:
        """Decorator registering ``factory`` under ``name``; ``help`` defaults to its docstring."""

        def deco(factory: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = help or (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[name] = Entry(name, factory, doc)
            return factory

        return deco

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._entries

    def entry(self, name: str, *, where: str | None = None) -> Entry:
        _load_builtins()
        if name not in self._entries:
            place = f"{where}: " if where else ""
            raise ConfigError(
                f"{place}unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def get(self, name: str, *, where: str | None = None) -> Callable:
        return self.entry(name, where=where).factory

    def create(self, name: str, *, where: str | None = None, **options: Any) -> Any:
        """Build ``name`` with ``options``; unknown options raise a ConfigError naming them."""
        factory = self.get(name, where=where)
        what = f"{where or self.kind} {name!r}"
        check_options(factory, options, what)
        try:
            return factory(**options)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            # an option of the wrong type or value that the factory did not check itself
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{what}: invalid option value ({first[:160]})") from None

    def items(self) -> list[Entry]:
        _load_builtins()
        return [self._entries[n] for n in sorted(self._entries)]


def check_options(factory: Callable, options: dict[str, Any], what: str) -> None:
    """Raise ConfigError if ``options`` holds a keyword that ``factory`` does not accept."""
    sig = inspect.signature(factory)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"{what} has no option {key!r}; valid options: {', '.join(valid) or '(none)'}"
            )


TASKS = Registry("task")
DATASETS = Registry("dataset")
BACKBONES = Registry("backbone")
HEADS = Registry("head")
ARCHS = Registry("architecture")
BALANCERS = Registry("balancer")

ALL = {
    "task": TASKS,
    "dataset": DATASETS,
    "backbone": BACKBONES,
    "head": HEADS,
    "architecture": ARCHS,
    "balancer": BALANCERS,
}

_loaded = False


def _load_builtins() -> None:
    """Import the built-in component modules once so their ``register`` calls run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in ("mtlcv.tasks", "mtlcv.data", "mtlcv.models", "mtlcv.balancing"):
        importlib.import_module(mod)
