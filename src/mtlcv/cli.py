"""The ``mtlcv`` command line: train, eval, compare, report, predict, export, data, bench,
classic, list, config, demo.

Every user mistake (a bad config key, a missing file, a corrupt cache) is an
:class:`~mtlcv.errors.MtlcvError`: the CLI prints its one line and exits with code 2, never a
traceback. During training SIGTERM finishes the step, saves a checkpoint and exits with 75
(:class:`~mtlcv.errors.Preempted`); Ctrl-C exits with 130 and keeps the last checkpoint; SIGTERM
outside training exits with 143 and one line. Under torchrun only ``train`` runs.
With ``--json`` (eval, compare, list, config keys/options, bench) stdout holds the JSON alone;
logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .cli_config import add_config_parser
from .errors import CheckpointError, ConfigError, MtlcvError, Preempted


def _console():  # rich is imported lazily: `mtlcv --help` stays fast
    from rich.console import Console

    # piped output (logs, CI) gets a wide fixed width instead of rich's 80-column default
    return Console() if sys.stdout.isatty() else Console(width=200)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 96x128, got {text!r}") from None
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"image size must be at least 8x8, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


# ---------------------------------------------------------------------- commands
def new_run_dir(parent: Path, name: str) -> Path:
    """A fresh ``parent/NAME-YYYYmmdd-HHMMSS[-k]``, created atomically: two launches in the same
    second get different folders (mkdir either creates a folder or fails, never both)."""
    from .engine.checkpoint import _reason

    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {str(parent)!r}: {_reason(exc)}") from None
    for k in range(1, 1000):
        path = parent / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {str(path)!r}: {_reason(exc)}") \
                from None
    raise ConfigError(f"cannot find a free run directory name {stamp}-k in {str(parent)!r}")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load
    from .engine import distributed
    from .engine.trainer import train

    restarted = distributed.restart_count() > 0
    under_torchrun = distributed.env_world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out DIR, the run directory to continue")
    if under_torchrun and args.out is None:
        raise ConfigError(
            "under torchrun pass --out DIR: every process and every restart must name the same "
            "run directory"
        )
    out = Path(args.out) if args.out is not None else None
    # continue when asked, when told to continue whatever is there, and after torchrun restarted
    # a failed worker group (the run directory then holds the last checkpoint)
    resume = args.resume or (
        (args.auto_resume or restarted) and out is not None and (out / "last.pt").is_file()
    )
    if args.config is None and not resume:
        raise ConfigError("train needs --config FILE (see configs/ for ready experiments)")
    config = args.config
    if config is None:  # resume with the run's own config
        config = out / "config.yaml"
    cfg = load(config, args.set)
    made = None
    if out is None:
        out = made = new_run_dir(Path("runs"), cfg.name)
    try:
        results = train(cfg, out, resume=resume)
        if results is not None and distributed.is_main():
            _print_results(results, out)
    except BaseException:
        if made is not None and not any(made.iterdir()):
            made.rmdir()  # a run that never started leaves no empty folder behind
        raise
    finally:
        distributed.shutdown()
    return 0


def _print_results(results: dict, out: Path) -> None:
    from .analysis.tables import aux_tasks, comparison_table, metric_directions

    higher = metric_directions(results)
    con = _console()
    con.print(comparison_table({results["name"]: results}, higher, title=f"test metrics ({out})",
                               aux=aux_tasks(results)))
    if "delta_m" in results:
        con.print(
            f"Δm vs {results['baselines']}: {results['delta_m']['test']:+.2f}% (lower is better)"
        )
    con.print(f"run directory: {out}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .analysis import delta_m, main_metrics, on_baseline_metrics
    from .analysis.tables import comparison_table
    from .config import load
    from .engine.checkpoint import load_checkpoint
    from .engine.evaluate import evaluate
    from .engine.experiment import build, load_baselines, make_loader
    from .engine.protocol import check_baseline_protocol

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {str(run)!r} is not a run directory (no config.yaml)")
    cfg = load(run / "config.yaml", args.set)
    path = run / f"{args.checkpoint}.pt"
    ckpt = load_checkpoint(path)  # before building: a bad file costs no data loading
    # evaluation never augments, whatever the split: two calls give the same numbers
    exp = build(cfg, splits=(args.split,), augment=False)
    try:
        exp.model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model of {str(run / 'config.yaml')!r} "
            f"(model.arch {cfg.model.arch!r}): {first[:160]}"
        ) from None
    loader = make_loader(cfg, exp.datasets[args.split], train=False)
    metrics = evaluate(exp.model, exp.tasks, loader, exp.device, cfg.eval.protocol,
                       progress=f"{args.split} split")
    higher = {n: dict(t.higher_is_better) for n, t in exp.tasks.items()}
    result = {
        "name": cfg.name,
        "protocol": cfg.eval.protocol,
        "split": args.split,
        "checkpoint": args.checkpoint,
        "epoch": ckpt.get("epoch"),
        args.split: metrics,
        "higher_is_better": higher,
    }
    if cfg.baselines:
        base = load_baselines(cfg.baselines).get(args.split)
        if base is not None:  # baselines have val and test metrics, not train
            check_baseline_protocol(cfg)  # Δm only within one evaluation protocol
            main = main_metrics(metrics, cfg.aux_tasks)
            result["delta_m"] = delta_m(on_baseline_metrics(main, base), base, higher)
    if args.json:
        _emit_json(args, result)
        return 0
    con = _console()
    con.print(
        comparison_table(
            {f"{cfg.name} ({args.checkpoint}, epoch {result['epoch']})": {"test": metrics}},
            higher,
            title=f"{args.split} metrics of {run}",
            aux=cfg.aux_tasks,
        )
    )
    if "delta_m" in result:
        con.print(f"Δm vs {cfg.baselines}: {result['delta_m']:+.2f}% (lower is better)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis.tables import metric_directions
    from .config import apply_overrides, read_yaml, switch_dataset
    from .engine.checkpoint import atomic_write_text
    from .engine.grid import (
        grid_section,
        grid_table,
        markdown_table,
        parse_vary,
        run_grid,
        summarise,
    )

    data = read_yaml(args.config)
    grid = grid_section(data.pop("grid", None), args.config)
    base = apply_overrides(switch_dataset(data, args.set, repr(str(args.config))), args.set)
    seeds = _int_list(args.seeds, "--seeds") if args.seeds is not None else grid["seeds"]
    vary = parse_vary(args.vary) if args.vary else grid["vary"]
    baseline = args.baseline if args.baseline is not None else grid["baseline"]
    vs, base_v = run_grid(base, vary, seeds, args.out, baseline=baseline, jobs=args.jobs)
    higher = metric_directions(next(iter(vs[0].runs.values())))
    rows = summarise(vs, base_v, higher)
    out = Path(args.out)
    atomic_write_text(json.dumps(rows, indent=2), out / "summary.json")
    atomic_write_text(markdown_table(rows, higher) + "\n", out / "summary.md")
    if args.json:
        _emit_json(args, rows)
        return 0
    title = f"test split, mean over seeds {', '.join(map(str, seeds))}"
    if base_v is not None:
        title += f"; Δm vs {base_v.label} (lower is better)"
    _console().print(grid_table(rows, higher, title=title))
    print(f"summary: {out / 'summary.md'}  {out / 'summary.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import build_report

    start = time.perf_counter()
    pareto = [v.strip() for v in args.pareto.split(",")] if args.pareto else None
    only = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    page = build_report(
        args.path, args.out, pareto=pareto, variants=only, images=args.images,
        qualitative=not args.no_qualitative, overrides=args.set,
    )
    pngs = sorted(page.parent.glob("*.png"))
    print(f"report: {page} ({len(pngs)} figures as PNG beside it; "
          f"{time.perf_counter() - start:.0f} s)")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers, e.g. 0,1") from None
    if not values:
        raise ConfigError(f"{what} {text!r}: expected at least one integer")
    return values


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from .data.scenes import write_cache

    path = write_cache(args.out, n=args.n, size=args.size, seed=args.seed, progress=True)
    print(f"wrote {args.n} scenes at {args.size[0]}x{args.size[1]} to {path}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import main_check

    return main_check(args.path, kind=args.kind)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "train":
        from .bench.train import main as bench_main
    else:
        from .bench.balancing import main as bench_main

    if "--json" not in args.options:
        return bench_main(args.options)
    import contextlib

    out = sys.stdout  # the JSON alone on stdout; anything else printed goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        return bench_main(args.options, out=out)


def cmd_list(args: argparse.Namespace) -> int:
    import torch

    from .models.complexity import arch_size, format_size
    from .registry import ALL, BACKBONES

    # architectures are built to count parameters and FLOPs only when asked for (listed alone,
    # or --size/--backbone given): building all of them is what makes a plain `list` slow
    sizes = not args.no_size and (
        args.kind == "architecture" or args.size is not None or args.backbone is not None
    )
    size, backbone = args.size or (96, 128), args.backbone or "tiny"
    if sizes:
        BACKBONES.entry(backbone, where="--backbone")  # a bad name: one line, exit 2
    threads = torch.get_num_threads()
    # one forward pass of one image each: threads gain little, and on a shared machine an OpenMP
    # team waiting for a busy core made `list` twice as slow
    torch.set_num_threads(1)
    rows = []
    try:
        for kind, reg in ALL.items():
            if args.kind and kind != args.kind:
                continue
            for entry in reg.items():
                row = {"kind": kind, "name": entry.name, "help": entry.help}
                if kind == "architecture" and sizes:
                    row["complexity"] = arch_size(entry.name, size, backbone=backbone)
                rows.append(row)
                if not args.json:
                    line = f"{kind:<13} {entry.name:<16} {entry.help}"
                    if "complexity" in row:
                        line += f" [{format_size(row['complexity'])}]"
                    print(line, flush=True)  # line by line: the first ones show at once
    finally:
        torch.set_num_threads(threads)
    if args.json:
        _emit_json(args, rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .analysis.tables import comparison_table, metric_directions
    from .demo import run_demo

    start = time.perf_counter()
    results = run_demo(args.out, epochs=args.epochs, overrides=args.set)
    higher = metric_directions(results["hps"])
    con = _console()
    con.print(
        comparison_table(
            {"STL": results["stl"], "HPS": results["hps"]},
            higher,
            baseline="STL",
            title=f"scenes test split: single-task baselines (STL) vs hard sharing (HPS), "
            f"{results['hps']['epochs']} epochs each",
        )
    )
    wins, losses = [], []
    for task, ms in higher.items():
        for m, hib in ms.items():
            a, b = results["hps"]["test"][task][m], results["stl"]["test"][task][m]
            (wins if (a > b) == hib and a != b else losses).append(f"{task}.{m}")
    con.print(
        f"HPS is better than STL on {len(wins)} of {len(wins) + len(losses)} metrics"
        + (f"; worse on: {', '.join(losses)}" if losses else "")
    )
    con.print(
        f"parameters: STL {results['stl']['parameters']:,}, HPS {results['hps']['parameters']:,}"
    )
    con.print(f"run directories: {results['stl']['run_dir']}  {results['hps']['run_dir']}")
    con.print(f"demo time: {time.perf_counter() - start:.0f} s")
    return 0


def cmd_classic(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .classic.compare import run

    seeds = _int_list(args.seeds, "--seeds")
    if len(seeds) < 2:
        print("mtlcv classic: one seed gives no spread; use --seeds 0,1,2,3,4", file=sys.stderr)
    result = run(args.method, args.dataset, seeds, train_size=args.train_size)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        _emit_json(args, result)
        return 0
    s = result["summary"]
    table = Table(title=f"{result['dataset']} test split, {result['method']} "
                  f"({result['family']}; {result['paper']}), mean ± std over seeds "
                  f"{', '.join(map(str, seeds))}")
    for col in ("task", "metric", "STL (same family)", "MTL", "vs STL", "ℓ2 reference"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, ms in result["higher_is_better"].items():
        for m, hib in ms.items():
            cell = {k: s[k][task][m] for k in ("stl", "mtl", "l2")}
            rel = 100.0 * (cell["mtl"]["mean"] - cell["stl"]["mean"]) / cell["stl"]["mean"]
            rel = rel if hib else -rel
            table.add_row(task, f"{m} {'↑' if hib else '↓'}",
                          *[f"{cell[k]['mean']:.4g} ± {cell[k]['std']:.2g}" for k in ("stl",
                                                                                      "mtl")],
                          f"{rel:+.1f}%", f"{cell['l2']['mean']:.4g} ± {cell['l2']['std']:.2g}")
    dm = s["delta_m"]
    table.add_section()
    table.add_row("Δm (a) ↓", "vs STL", "", f"{dm['stl']['mean']:+.2f} ± {dm['stl']['std']:.2f}%",
                  "", "")
    table.add_row("Δm (a) ↓", "vs ℓ2", f"{dm['stl_vs_l2']['mean']:+.2f} ± "
                  f"{dm['stl_vs_l2']['std']:.2f}%", f"{dm['l2']['mean']:+.2f} ± "
                  f"{dm['l2']['std']:.2f}%", "", "")
    con = _console()
    con.print(table)
    con.print("Δm: mean over every metric of the relative change against the baseline, signed so "
              "that lower is better (negative: the multi-task model wins); per seed, then mean ± "
              "std over seeds.")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import load
    from .inference.commands import predict_files, summary_line

    predictor = load(args.run or args.checkpoint, device=args.device)
    summary = predict_files(
        predictor, args.input, args.out, batch_size=args.batch_size, fit=args.fit
    )
    print(summary_line(summary, args.out))
    return 1 if summary["failed"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .inference import export, load

    predictor = load(args.run or args.checkpoint, device="cpu")
    r = export(predictor, args.format, args.out, size=args.size, exporter=args.onnx_exporter)
    print(f"wrote {r['file']} ({r['format']} via {r['exporter']}, {r['bytes'] / 2**20:.1f} MiB)")
    i = r["input"]
    print(f"  input  {i['name']}: {i['dtype']} {i['shape']}, {i['is']}")
    for name, o in r["outputs"].items():
        kind = f" ({o['kind']})" if o["kind"] != name else ""
        print(f"  output {name}{kind}: {o['shape']}, {o['is']}")
    if r["verified"]:
        worst = max(r["max_abs_diff"].values(), default=0.0)
        print(
            f"checked on a random batch of {r['check_batch']}: max |diff| vs PyTorch "
            f"{worst:.2g} (tolerance 1e-4)"
        )
    else:
        print(r["note"])
    return 0


def _add_source(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="run directory (its best.pt)")
    src.add_argument("--checkpoint", metavar="FILE", help="checkpoint file (best.pt, last.pt)")


# ---------------------------------------------------------------------- parser
def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlcv", description="Multi-task learning for dense vision.")
    p.add_argument("--version", action="version", version=f"mtlcv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train an experiment from a YAML config",
        epilog="Every config key with its default and meaning: mtlcv config keys. A config "
        "resolved with its overrides: mtlcv config show --config FILE --set KEY=VALUE. "
        "Component options: mtlcv config options [KIND [NAME]].",
    )
    t.add_argument("--config", help="experiment YAML (optional with --resume)")
    _add_set(t, "override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/NAME-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    t.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue the run in --out when it holds a checkpoint, else start it (for jobs "
        "that a scheduler requeues; torchrun restarts do this by themselves)",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--checkpoint", default="best", choices=("best", "last"))
    _add_set(e, "override a config key (e.g. data.root=PATH)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("compare", help="train a grid of variants x seeds and tabulate them")
    g.add_argument("--config", required=True, help="base experiment YAML")
    _add_set(g, "override a key of the base config (repeatable)")
    g.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values to compare, e.g. model.arch=stl,hps",
    )
    g.add_argument(
        "--seeds", help="comma-separated seeds (default: the config's grid.seeds, else 0)"
    )
    g.add_argument(
        "--baseline",
        metavar="KEY=VALUE",
        help="the combination Δm is measured against, e.g. model.arch=stl",
    )
    g.add_argument("--out", required=True, help="grid directory (finished runs are reused)")
    g.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        help="runs trained at once, each in its own process with cores/N threads (default 1)",
    )
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.set_defaults(func=cmd_compare)

    r = sub.add_parser(
        "report", help="HTML report (with PNG figures) of a run directory or a compare grid"
    )
    r.add_argument("path", help="a run directory (mtlcv train) or a grid directory (compare)")
    r.add_argument("--out", help="report folder (default PATH/report)")
    r.add_argument(
        "--pareto",
        metavar="TASK.METRIC,TASK.METRIC",
        help="the two test metrics of a grid's Pareto plot (default: each of the first two "
        "tasks' first metric)",
    )
    r.add_argument("--variants", metavar="A,B", help="report only these variants of a grid")
    r.add_argument(
        "--images", type=_positive, default=4, help="val images in the qualitative grid (4)"
    )
    r.add_argument(
        "--no-qualitative", action="store_true", help="skip the predictions on val images"
    )
    _add_set(r, "override a key of the runs' configs for the predictions, e.g. data.root=PATH")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("data", help="make or check datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    s = dsub.add_parser("scenes", help="render the procedural indoor-scenes dataset to a cache")
    s.add_argument("--n", type=_positive, default=600, help="number of images (default 600)")
    s.add_argument("--size", type=_size, default=(96, 128), help="HxW (default 96x128)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="cache folder to write")
    s.set_defaults(func=cmd_data_scenes)
    c = dsub.add_parser(
        "check", help="validate a dataset folder or file or a scenes cache; names every bad file"
    )
    c.add_argument(
        "path", help="dataset folder, NYUv2 .mat file, fixture folder/npz or scenes cache"
    )
    c.add_argument(
        "--kind",
        choices=("nyuv2", "nyuv2-mat", "nyuv2-fixture", "scenes", "cityscapes",
                 "cityscapes-official", "pascal-context", "office-31", "office-home"),
        help="layout (default: detected from PATH)",
    )
    c.set_defaults(func=cmd_data_check)

    b = sub.add_parser("bench", help="benchmarks printed as ratios measured in one run")
    b.add_argument(
        "what",
        choices=("balancing", "train"),
        help="balancing: step time and peak memory of every balancer vs equal weights; train: "
        "the training step vs a hand-written loop and vs torchjd, data delivery vs consumption",
    )
    b.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="options of the benchmark (see mtlcv bench balancing|train --help)",
    )
    b.set_defaults(func=cmd_bench)

    ls = sub.add_parser("list", help="list registered tasks, datasets, models and balancers")
    ls.add_argument(
        "kind",
        nargs="?",
        choices=("task", "dataset", "backbone", "head", "architecture", "balancer"),
    )
    ls.add_argument(
        "--size",
        type=_size,
        default=None,
        help="resolution for the architectures' FLOPs (default 96x128); parameters and FLOPs "
        "are counted for `list architecture` or when --size or --backbone is given",
    )
    ls.add_argument(
        "--backbone",
        default=None,
        help="backbone for the architectures' counts (default tiny)",
    )
    ls.add_argument(
        "--no-size",
        action="store_true",
        help="skip building architectures to count parameters and FLOPs",
    )
    ls.add_argument("--json", action="store_true", help="print JSON instead of text")
    ls.set_defaults(func=cmd_list)

    cl = sub.add_parser("classic", help="a classic MTL method vs single-task models, over seeds")
    cl.add_argument("--method", required=True,
                    help="network (Caruana 1997), l21 (feature selection), trace (low rank) or "
                    "instance (Bickel et al. 2008)")
    cl.add_argument("--dataset", required=True,
                    help="digits, linnerud, diabetes (bundled with scikit-learn), sparse or "
                    "lowrank (synthetic)")
    cl.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    cl.add_argument("--train-size", type=float, default=None,
                    help="training fraction (real data) or samples per task (synthetic)")
    cl.add_argument("--out", help="also write the full result (every seed) to this JSON file")
    cl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cl.set_defaults(func=cmd_classic)
    pr = sub.add_parser("predict", help="run a trained model on your images; write every task")
    _add_source(pr)
    pr.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, folders or quoted glob patterns",
    )
    pr.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (one subfolder per task)"
    )
    pr.add_argument(
        "--batch-size", type=_positive, default=8, metavar="N", help="images per batch (8)"
    )
    pr.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    pr.add_argument(
        "--fit",
        choices=("resize", "pad"),
        default="resize",
        help="bring images to the model's size by stretching (default) or by padding",
    )
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export a trained model to TorchScript or ONNX")
    _add_source(ex)
    ex.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    ex.add_argument("--out", required=True, metavar="FILE", help="file to write (.pt or .onnx)")
    ex.add_argument(
        "--size", type=_size, metavar="HxW", help="the graph's input size (default: as trained)"
    )
    ex.add_argument(
        "--onnx-exporter",
        choices=("auto", "torchscript", "dynamo"),
        default="auto",
        help="PyTorch's ONNX exporter (auto: the TorchScript-based one while it exists)",
    )
    ex.set_defaults(func=cmd_export)

    add_config_parser(sub)

    m = sub.add_parser("demo", help="STL vs hard sharing on the embedded scenes data (CPU)")
    m.add_argument("--out", default="runs/demo", help="where the two runs go (default runs/demo)")
    m.add_argument("--epochs", type=_positive, help="epochs per run (default 6)")
    _add_set(m, "override a key of the demo config")
    m.set_defaults(func=cmd_demo)
    return p


def _emit_json(args: argparse.Namespace, obj: object) -> None:
    """Print ``obj`` as JSON on the real stdout (with ``--json`` all else goes to stderr)."""
    print(json.dumps(obj, indent=2), file=getattr(args, "json_out", sys.stdout), flush=True)


def _run(args: argparse.Namespace) -> int:
    if not getattr(args, "json", False):
        return args.func(args)
    import contextlib

    # with --json, stdout holds the JSON alone: logs, progress bars and notes go to stderr
    args.json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return args.func(args)
class Terminated(Exception):
    """SIGTERM outside training (training handles it itself: it saves a checkpoint first)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _rank_prefix() -> str | None:
    """'' for rank 0 (or a single process), '[rank r] ' for others; None: print nothing."""
    from .engine import distributed

    rank = int(os.environ.get("RANK", "0")) if distributed.env_world_size() > 1 else 0
    return "" if rank == 0 else f"[rank {rank}] "


#: OpenMP's wait policy for the command line, unless the user sets one: idle threads of
#: PyTorch's thread team sleep instead of spinning. Measured on a shared 2-core machine
#: (docs/performance.md, "The demo on a laptop"): with two other busy processes, a demo step
#: with the default two threads took 13.1 s spinning (active) and 0.46 s passive; quiet, 1.9 s
#: and 0.34 s. OpenMP reads it once, when torch is first imported: main() sets it before that.
OMP_WAIT_POLICY = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from .engine.distributed import env_world_size

        if env_world_size() > 1 and args.func is not cmd_train:
            raise ConfigError(
                f"only `mtlcv train` runs under torchrun (WORLD_SIZE={env_world_size()}); run "
                f"`mtlcv {args.command}` in one process, or each of compare's runs with torchrun"
            )
        return _run(args)
    except Preempted as exc:
        if _rank_prefix() == "":
            print(f"mtlcv: {exc}", file=sys.stderr)
        return exc.exit_code
    except MtlcvError as exc:
        prefix = _rank_prefix()
        if prefix == "" or not getattr(exc, "agreed", False):
            print(f"mtlcv: {prefix}error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "mtlcv: interrupted; the last checkpoint is kept (continue with train --resume, or "
            "rerun the same compare command)",
            file=sys.stderr,
        )
        return 130
    except Terminated:
        print("mtlcv: terminated by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except RuntimeError as exc:
        from .engine import distributed

        if distributed.env_world_size() <= 1:
            raise
        # a collective failed: another process of the group died (torchrun restarts or stops
        # the group); one line, not a traceback of every survivor
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "RuntimeError"
        print(f"mtlcv: {_rank_prefix()}error: the process group failed ({first})",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
