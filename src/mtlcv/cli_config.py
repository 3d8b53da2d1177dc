"""``mtlcv config show | keys | options``: the configuration, discoverable from the command line.

* ``config show [--config FILE] [--set KEY=VALUE ...]`` prints the resolved config as commented
  YAML: every key with its value, its one-line meaning and its default, and under each
  component (dataset, backbone, head, architecture, balancer) every option its factory takes.
  The output is itself a valid config (``mtlcv config show --config A --set ... > B.yaml``),
  and showing a config checks it as ``train`` would (unknown keys, types, component options).
* ``config keys`` lists every key with its type, default and meaning.
* ``config options [KIND [NAME]]`` lists the options of registered components, from their
  factories' signatures.

Meanings come from :mod:`mtlcv.config_docs` (the ``#:`` comments of the config dataclasses and
the factories' docstrings), so they cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys

KINDS = ("dataset", "backbone", "head", "architecture", "balancer")


def _emit_json(args: argparse.Namespace, obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str), file=getattr(args, "json_out", sys.stdout))


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from .config import apply_overrides, from_dict, read_yaml, switch_dataset
    from .config_docs import check_component_options, show
    from .engine.grid import grid_section

    data, grid = {}, None
    if args.config is not None:
        data = read_yaml(args.config)
        # a comparison grid's config: its base experiment, then its grid section as it is
        grid = data.pop("grid", None)
        grid_section(grid, args.config)
        data = switch_dataset(data, args.set, repr(str(args.config)))
    cfg = from_dict(apply_overrides(data, args.set))
    check_component_options(cfg)
    source = args.config or "the defaults"
    header = f"mtlcv config show: {source}" + "".join(f" --set {s}" for s in args.set)
    header += "\nvalue  # meaning [default]; options not set are commented out with their default"
    sys.stdout.write(show(cfg, header=header))
    if grid is not None:
        sys.stdout.write("\n# the comparison grid (mtlcv compare --config FILE --out DIR)\n")
        sys.stdout.write(yaml.safe_dump({"grid": grid}, sort_keys=False))
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from .config_docs import config_keys, keys_table

    rows = keys_table(config_keys())
    if args.json:
        _emit_json(args, [dict(zip(("key", "type", "default", "meaning"), r)) for r in rows])
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for key, tp, default, meaning in rows:
        print(f"{key:<{widths[0]}}  {tp:<{widths[1]}}  {default:<{widths[2]}}  {meaning}")
    print("\ncomponent options (data.options, model.backbone, model.head, model.options, "
          "balancer.options): mtlcv config options KIND [NAME]")
    return 0


def cmd_config_options(args: argparse.Namespace) -> int:
    import dataclasses

    from .config_docs import COMPONENTS, component_options, yaml_value
    from .registry import ALL

    kinds = [args.kind] if args.kind else list(KINDS)
    out: list[dict[str, object]] = []
    for kind in kinds:
        names = [args.name] if args.name else ALL[kind].names()
        for name in names:
            opts = component_options(kind, name)
            out.append({"kind": kind, "name": name, "config_key": COMPONENTS[kind].options_key,
                        "options": [dataclasses.asdict(o) for o in opts]})
    if args.json:
        _emit_json(args, out)
        return 0
    for entry in out:
        print(f"{entry['kind']} {entry['name']}  ({entry['config_key']})")
        if not entry["options"]:
            print("  (no options)")
        for o in entry["options"]:
            value = "(required)" if o["required"] else yaml_value(o["default"])
            tp = f"{o['type']} " if o["type"] else ""
            line = f"  {o['name']}: {tp}= {value}"
            print(f"{line:<48}  {o['meaning']}".rstrip())
    return 0


def add_config_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``mtlcv config ...`` to the CLI's subparsers ``sub``."""
    c = sub.add_parser("config", help="show a resolved config, every key, component options")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")

    s = csub.add_parser(
        "show",
        help="the resolved config: every key's value, meaning and default (valid YAML)",
        description="Print the resolved config as commented YAML: every key's value, meaning "
        "and default, and every option of its dataset, backbone, head, architecture and "
        "balancer. The output is a valid config file.",
    )
    s.add_argument("--config", help="experiment YAML (default: the built-in defaults)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as for train (repeatable)")
    s.set_defaults(func=cmd_config_show)

    k = csub.add_parser("keys", help="every config key with its type, default and meaning")
    k.add_argument("--json", action="store_true", help="print JSON instead of a table")
    k.set_defaults(func=cmd_config_keys)

    o = csub.add_parser("options", help="the options of registered components (from signatures)")
    o.add_argument("kind", nargs="?", choices=KINDS)
    o.add_argument("name", nargs="?", help="a registered name (default: all of KIND)")
    o.add_argument("--json", action="store_true", help="print JSON instead of text")
    o.set_defaults(func=cmd_config_options)
