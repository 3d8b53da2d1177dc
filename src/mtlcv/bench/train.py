"""mtlcv's training step against what a user would otherwise write or install, in one run.

    mtlcv bench train [--json] [--quick] [--rounds N] [--threads N]

Three comparisons, each measured side by side in one process on the same model, batch and data,
in interleaved rounds (``A B A B ...``, the order of each round shuffled), medians reported:

1. **Step.** mtlcv's training step, :meth:`mtlcv.engine.trainer.Trainer.train_step` of a real
   :class:`~mtlcv.engine.trainer.Trainer` (the code ``mtlcv train`` runs, not a copy: device
   transfer, the batch check, per-task losses and their counts, ``balancer.backward``,
   ``optimizer.step``, the ``after_step`` closures) with equal weights, against a minimal
   hand-written PyTorch loop on the same model, optimizer kind and batch (``zero_grad``,
   forward, ``sum(losses).backward()``, ``step``). The weights are restored before every step
   (outside the timing). Target: ratio <= 1.03.
2. **Jacobian methods vs torchjd** (optional dependency, ``pip install 'mtlcv[bench]'``; the
   comparison is skipped with a line when torchjd is absent). mtlcv's UPGrad, MGDA and Nash-MTL
   (``balancer.backward`` + ``optimizer.step``) against torchjd doing the same update on the
   same model: route ``autojac`` (``mtl_backward`` on the shared representation, then
   ``jac_to_grad`` of the shared parameters with the aggregator) and route ``autogram``
   (``Engine(backbone).compute_gramian(losses)``, the weighting, ``losses.backward(weights)``;
   only for Gramian-based weightings: torchjd's Nash-MTL is an aggregator of the matrix, not of
   the Gramian, so it has no autogram route). Target: mtlcv <= 0.8x the faster torchjd route.
   Also the Gramian alone: mtlcv's exact per-task Gramian of the shared parameters
   (:func:`mtlcv.balancing.jacobian.task_gradients` with ``gramian=True``) against torchjd's
   ``autogram.Engine`` on the same losses: time ratio and max abs difference.
3. **Data pipeline.** The training loader's delivery rate (samples/s of iterating
   :meth:`Trainer.train_loader`, augmentation on) over the step's consumption rate (samples/s
   of ``train_step`` on those batches), at the demo configuration (scenes 96x128, batch 8,
   tiny backbone) and at NYUv2's shape (288x384, batches 2 and 8, augmentation on; synthetic
   frames in the mtan ``.npy`` layout written to a temporary folder, consumed by the tiny
   backbone, whose step is the cheapest and so the hardest for the loader to keep fed). Target:
   ratio >= 5.

``--quick`` shrinks everything (32x48 images, batch 2, two rounds) so that CI checks the
benchmark runs; its numbers mean nothing. The CPU runs on one thread by default.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..errors import ConfigError

#: targets of the issue (project issue 14)
STEP_TARGET = 1.03
TORCHJD_TARGET = 0.8
DATA_TARGET = 5.0

#: mtlcv balancer name -> torchjd aggregator class name (the same update rule)
TORCHJD_METHODS = {"upgrad": "UPGrad", "mgda": "MGDA", "nashmtl": "NashMTL"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], prepare: Callable[[], None] | None,
                rounds: int, warmup: int, device: torch.device, seed: int = 0,
                ) -> dict[str, list[float]]:
    """Time every function once per round, in a shuffled order; ``prepare`` runs (untimed)
    before each call. Returns the timed rounds' seconds per function."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            if prepare is not None:
                prepare()
            t = _time(fns[k], device)
            if r >= warmup:
                out[k].append(t)
    return out


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------ trainer setup
@contextlib.contextmanager
def make_trainer(data: dict[str, Any], *, batch_size: int, size: Sequence[int] | None = None,
                 balancer: str = "fixed", device: str = "cpu", threads: int | None = 1,
                 extra: Sequence[str] = ()) -> Iterator[Any]:
    """A real :class:`Trainer` on the tiny HPS model (3 dense tasks) in a temporary run
    directory, with ``data`` as its ``data`` section (``batch_size`` and augmentation set)."""
    from ..config import apply_overrides, from_dict
    from ..engine.trainer import Trainer

    raw: dict[str, Any] = {
        "name": "bench-train",
        "tasks": ["semseg", "depth", "normals"],
        "data": {**data, "batch_size": batch_size, "augment": True},
        "model": {"arch": "hps", "backbone": {"name": "tiny"}, "head": {"name": "light"}},
        "optim": {"name": "adam", "lr": 1e-3},
        "balancer": {"name": balancer},
        "train": {"epochs": 1, "device": device, "progress": False, "threads": threads},
        "seed": 0,
    }
    cfg = from_dict(apply_overrides(raw, list(extra)))
    with tempfile.TemporaryDirectory(prefix="mtlcv-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", log=lambda s: None, command="mtlcv bench train")
        try:
            yield trainer
        finally:
            trainer.close()


def write_nyuv2_like(root: Path, n_train: int, n_val: int, size: Sequence[int] = (288, 384),
                     seed: int = 0) -> Path:
    """Random frames in the mtan ``.npy`` layout (``ROOT/{train,val}/{image,label,depth,normal}``)
    at NYUv2's shape: the loader reads and augments them exactly as it would the release."""
    rng = np.random.default_rng(seed)
    H, W = size
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            normal = rng.standard_normal((H, W, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            np.save(root / split / "image" / f"{i}.npy", rng.random((H, W, 3), dtype=np.float32))
            np.save(root / split / "label" / f"{i}.npy",
                    rng.integers(-1, 13, (H, W)).astype(np.float32))
            np.save(root / split / "depth" / f"{i}.npy",
                    (0.5 + 4 * rng.random((H, W, 1))).astype(np.float32))
            np.save(root / split / "normal" / f"{i}.npy", normal)
    return root


# ------------------------------------------------------------------ 1. step vs hand loop
def bench_step(data: dict[str, Any], batch_size: int, rounds: int, warmup: int,
               device: str, threads: int | None) -> dict[str, Any]:
    """The trainer's step (equal weights) vs a hand-written loop on the same model and batch."""
    with make_trainer(data, batch_size=batch_size, device=device, threads=threads) as tr:
        dev = tr.device
        batch = next(iter(tr.train_loader()))
        model, tasks, names = tr.model, tr.tasks, tr.names
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        hand_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        on_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

        def hand() -> None:
            hand_opt.zero_grad(set_to_none=True)
            preds = model(on_dev["image"])
            loss = sum(tasks[n].loss(preds[n], on_dev[n]) for n in names)
            loss.backward()
            hand_opt.step()

        def mtlcv_step() -> None:
            tr.train_step(batch)

        def prepare() -> None:
            model.load_state_dict(snapshot)

        t = interleaved({"mtlcv": mtlcv_step, "hand": hand}, prepare, rounds, warmup, dev)
        ratios = [a / b for a, b in zip(t["mtlcv"], t["hand"])]
        ratio = _median(ratios)
        return {"batch_size": batch_size, "mtlcv_s": _median(t["mtlcv"]),
                "hand_s": _median(t["hand"]), "ratio": ratio, "target": STEP_TARGET,
                "met": ratio <= STEP_TARGET}


def bench_options(data: dict[str, Any], batch_size: int, rounds: int, warmup: int,
                  device: str, threads: int | None, compile: bool) -> dict[str, Any]:
    """The trainer's step with ``train.channels_last`` (and ``train.compile``) against the
    default, each its own trainer (same seed: same initial weights) on the same batch."""
    variants = {"default": [], "channels_last": ["train.channels_last=true"]}
    if compile:
        variants["compile"] = ["train.compile=true"]
    with contextlib.ExitStack() as stack:
        trainers = {k: stack.enter_context(make_trainer(data, batch_size=batch_size,
                                                        device=device, threads=threads,
                                                        extra=v))
                    for k, v in variants.items()}
        batch = next(iter(trainers["default"].train_loader()))
        snaps = {k: {n: v.detach().clone() for n, v in tr.model.state_dict().items()}
                 for k, tr in trainers.items()}
        dev = trainers["default"].device
        t0 = time.perf_counter()
        for tr in trainers.values():  # compilation happens here, outside the timing
            tr.train_step(batch)
        first = time.perf_counter() - t0

        def prepare() -> None:
            for k, tr in trainers.items():
                tr.model.load_state_dict(snaps[k])

        fns = {k: (lambda tr=tr: tr.train_step(batch)) for k, tr in trainers.items()}
        t = interleaved(fns, prepare, rounds, warmup, dev)
    out: dict[str, Any] = {"batch_size": batch_size, "first_steps_s": first}
    for k in variants:
        out[k] = {"step_s": _median(t[k]),
                  "ratio": _median([a / b for a, b in zip(t[k], t["default"])])}
    return out


# ------------------------------------------------------------------ 2. vs torchjd
def torchjd_version() -> str | None:
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchjd")
    except PackageNotFoundError:  # pragma: no cover - an unpackaged checkout
        return "unknown"


def bench_torchjd(size: Sequence[int], batch_size: int, rounds: int, warmup: int,
                  device: torch.device, methods: Sequence[str] = tuple(TORCHJD_METHODS),
                  ) -> dict[str, Any]:
    """mtlcv's UPGrad/MGDA/Nash-MTL vs torchjd's two routes, and the Gramian alone."""
    import torchjd.aggregation as tja
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    from .. import balancing
    from ..balancing.jacobian import task_gradients
    from ..models.build import build_model
    from .balancing import make_batch, make_tasks

    torch.manual_seed(0)
    tasks = make_tasks(3)
    model = build_model("hps", tasks, {"name": "tiny"}, {"name": "light"}).to(device)
    model.train()
    batch = make_batch(tasks, batch_size, tuple(size), device)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shared = list(model.shared_parameters())
    heads = [list(model.task_parameters(n)) for n in tasks]

    # autogram hooks every forward of the modules it watches: its own copy of the model (same
    # weights), so the other routes' forward passes do not reach its hooks
    model_ag = copy.deepcopy(model)
    engine = Engine(model_ag.backbone, batch_dim=None)

    def losses_of(m: Any = model) -> tuple[torch.Tensor, torch.Tensor]:
        preds = m(batch["image"])  # the model keeps its shared representation
        losses = torch.stack([t.loss(preds[n], batch[n]) for n, t in tasks.items()])
        assert m.representation is not None
        return losses, m.representation

    def prepare() -> None:
        for m in (model, model_ag):
            m.load_state_dict(snapshot)
            for p in m.parameters():
                p.grad = None

    out: dict[str, Any] = {"torchjd": torchjd_version(), "methods": {}}
    for name in methods:
        ours = balancing.create(name, num_tasks=len(tasks)).to(device)
        opt_ours = torch.optim.Adam([*model.parameters(), *ours.parameters()], lr=1e-3)
        opt_jd = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt_ag = torch.optim.Adam(model_ag.parameters(), lr=1e-3)
        cls_jd = getattr(tja, TORCHJD_METHODS[name])
        agg = cls_jd(n_tasks=len(tasks)) if name == "nashmtl" else cls_jd()
        # only a Gramian-weighted aggregator has an autogram route
        gramian_weighting = (agg.gramian_weighting
                             if isinstance(agg, tja.GramianWeightedAggregator) else None)

        def run_ours(ours: Any = ours, opt: Any = opt_ours) -> None:
            losses, _ = losses_of()
            ours.backward(losses, model)
            opt.step()

        def run_autojac(agg: Any = agg, opt: Any = opt_jd) -> None:
            # the representation that every head reads, as torchjd's examples cut the graph
            rep = model.encode(batch["image"])
            preds = model.decode(rep, batch["image"].shape[-2:])
            losses = [t.loss(preds[n], batch[n]) for n, t in tasks.items()]
            mtl_backward(losses, features=rep, shared_params=shared, tasks_params=heads)
            jac_to_grad(shared, agg)
            opt.step()

        fns: dict[str, Callable[[], Any]] = {"mtlcv": run_ours, "autojac": run_autojac}
        if gramian_weighting is not None:
            def run_autogram(w: Any = gramian_weighting, opt: Any = opt_ag) -> None:
                losses, _ = losses_of(model_ag)
                weights = w(engine.compute_gramian(losses))
                losses.backward(weights)
                opt.step()

            fns["autogram"] = run_autogram
        entry: dict[str, Any] = {"routes": list(fns)[1:]}
        try:
            t = interleaved(fns, prepare, rounds, warmup, device)
        except Exception as exc:  # a route that fails here is reported, not fatal
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            out["methods"][name] = entry
            continue
        best_route = min(fns.keys() - {"mtlcv"}, key=lambda k: _median(t[k]))
        ratios = [a / b for a, b in zip(t["mtlcv"], t[best_route])]
        ratio = _median(ratios)
        entry.update({f"{k}_s": _median(v) for k, v in t.items()})
        entry.update(faster_route=best_route, ratio=ratio, target=TORCHJD_TARGET,
                     met=ratio <= TORCHJD_TARGET)
        out["methods"][name] = entry

    # the Gramian alone (forward included in both): exact per-task Gramian of the shared params
    def gram_ours() -> torch.Tensor:
        losses, _ = losses_of()
        tg = task_gradients(losses, model, "param", gramian=True)
        assert tg.gramian is not None
        return tg.gramian

    def gram_jd() -> torch.Tensor:
        losses, _ = losses_of(model_ag)
        return engine.compute_gramian(losses)

    prepare()
    g1, g2 = gram_ours().double(), gram_jd().double()
    diff = float((g1 - g2).abs().max())
    rel = diff / float(g2.abs().max())
    t = interleaved({"mtlcv": gram_ours, "autogram": gram_jd}, prepare, rounds, warmup, device)
    ratios = [a / b for a, b in zip(t["mtlcv"], t["autogram"])]
    out["gramian"] = {"mtlcv_s": _median(t["mtlcv"]), "autogram_s": _median(t["autogram"]),
                      "ratio": _median(ratios), "max_abs_diff": diff, "max_rel_diff": rel}
    out.update(size=list(size), batch_size=batch_size)
    return out


# ------------------------------------------------------------------ 3. data pipeline
def bench_data(label: str, data: dict[str, Any], batch_size: int, batches: int,
               device: str, threads: int | None) -> dict[str, Any]:
    """Delivery (loader samples/s, augmentation on) over consumption (step samples/s)."""
    with make_trainer(data, batch_size=batch_size, device=device, threads=threads) as tr:
        dev = tr.device
        loader = tr.train_loader()
        got: list[Any] = []
        it = iter(loader)
        next(it)  # workers started, files opened
        t0 = time.perf_counter()
        for _ in range(batches):
            try:
                got.append(next(it))
            except StopIteration:
                break
        deliver = time.perf_counter() - t0
        n = sum(int(b["image"].shape[0]) for b in got)
        tr.train_step(got[0])  # warm-up
        times = []
        for b in got:
            times.append(_time(lambda b=b: tr.train_step(b), dev))
        consume = _median(times) * len(got)
        delivery, consumption = n / deliver, n / consume
        ratio = delivery / consumption
        return {"config": label, "batch_size": batch_size, "batches": len(got),
                "image_size": list(got[0]["image"].shape[-2:]),
                "num_workers": tr.cfg.data.num_workers,
                "delivery_samples_s": delivery, "consumption_samples_s": consumption,
                "ratio": ratio, "target": DATA_TARGET, "met": ratio >= DATA_TARGET}


# ------------------------------------------------------------------ the benchmark
def run(quick: bool = False, rounds: int = 7, warmup: int = 2, device: str | None = None,
        threads: int | None = 1, progress: bool = True) -> dict[str, Any]:
    """All three comparisons; a JSON-able dict (see the module doc)."""
    if rounds < 1 or warmup < 0:
        raise ConfigError(f"bench train: rounds must be >= 1 and warmup >= 0, got {rounds} and "
                          f"{warmup}")
    dev_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(dev_name)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    if quick:
        rounds, warmup = min(rounds, 2), min(warmup, 1)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="mtlcv-bench-data-") as tmp:
            return _run(quick, rounds, warmup, dev_name, dev, threads, Path(tmp), say)
    finally:
        torch.set_num_threads(old_threads)


def _run(quick: bool, rounds: int, warmup: int, dev_name: str, dev: torch.device,
         threads: int | None, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    if quick:
        demo = {"name": "scenes", "root": str(tmp / "scenes"),
                "options": {"n": 24, "size": [32, 48], "seed": 0}}
        demo_bs, nyu_size, nyu_bss, jd_size, jd_bs, batches = 2, (32, 48), (2,), (32, 48), 2, 3
    else:
        demo = {"name": "scenes", "options": {"n": 600, "size": [96, 128], "seed": 0}}
        demo_bs, nyu_size, nyu_bss, jd_size, jd_bs, batches = 8, (288, 384), (2, 8), (96, 128), 8, 6
    result: dict[str, Any] = {
        "device": dev_name if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick,
        "rounds": rounds, "warmup": warmup,
    }
    say("[bench train] 1/3 trainer step vs hand-written loop")
    result["step"] = bench_step(demo, demo_bs, rounds, warmup, dev_name, threads)
    say("[bench train] 1b/3 step options: channels_last" + ("" if quick else ", compile"))
    result["options"] = bench_options(demo, demo_bs, rounds, warmup, dev_name, threads,
                                      compile=not quick)
    say("[bench train] 2/3 UPGrad, MGDA, Nash-MTL vs torchjd")
    if torchjd_version() is None:
        result["torchjd"] = {"skipped": "torchjd is not installed (pip install 'mtlcv[bench]')"}
        say(f"[bench train] skipped: {result['torchjd']['skipped']}")
    else:
        with warnings.catch_warnings():  # cvxpy's note on torchjd's Nash-MTL problem (not DPP)
            warnings.simplefilter("ignore", UserWarning)
            result["torchjd"] = bench_torchjd(jd_size, jd_bs, rounds, warmup, dev)
    say("[bench train] 3/3 data pipeline delivery vs step consumption")
    nyu_root = write_nyuv2_like(tmp / "nyuv2", max(nyu_bss) * (batches + 2), 2, nyu_size)
    nyu = {"name": "nyuv2", "root": str(nyu_root)}
    result["data"] = [bench_data("demo", demo, demo_bs, batches, dev_name, threads)]
    for bs in nyu_bss:
        result["data"].append(bench_data(f"nyuv2-shape-b{bs}", nyu, bs, batches, dev_name,
                                         threads))
    return result


def format_lines(res: dict[str, Any]) -> list[str]:
    """The result as plain lines: every ratio beside its target."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    s = res["step"]
    lines = [f"mtlcv bench train ({res['device']}, torch {res['torch']}, {res['threads']} "
             f"thread(s), median of {res['rounds']} interleaved rounds)"
             + (" [quick: numbers mean nothing]" if res["quick"] else ""),
             f"step vs hand loop (batch {s['batch_size']}): {s['mtlcv_s'] * 1e3:.1f} ms vs "
             f"{s['hand_s'] * 1e3:.1f} ms = {s['ratio']:.3f}x (target <= {s['target']}x: "
             f"{verdict(s['met'])})"]
    o = res["options"]
    for k in o:
        if isinstance(o[k], dict) and k != "default":
            lines.append(f"step option {k}: {o[k]['step_s'] * 1e3:.1f} ms = {o[k]['ratio']:.3f}x "
                         "the default step (made the default only if < 1)")
    jd = res["torchjd"]
    if "skipped" in jd:
        lines.append(f"vs torchjd: skipped, {jd['skipped']}")
    else:
        for name, e in jd["methods"].items():
            if "error" in e:
                lines.append(f"{name} vs torchjd: error {e['error']}")
                continue
            routes = ", ".join(f"{r} {e[r + '_s'] * 1e3:.1f} ms" for r in e["routes"])
            lines.append(f"{name} vs torchjd {jd['torchjd']}: mtlcv {e['mtlcv_s'] * 1e3:.1f} ms; "
                         f"{routes}; ratio vs {e['faster_route']} {e['ratio']:.3f}x (target <= "
                         f"{e['target']}x: {verdict(e['met'])})")
        g = jd["gramian"]
        lines.append(f"Gramian alone: mtlcv {g['mtlcv_s'] * 1e3:.1f} ms vs autogram "
                     f"{g['autogram_s'] * 1e3:.1f} ms = {g['ratio']:.3f}x; max abs diff "
                     f"{g['max_abs_diff']:.2e} (relative {g['max_rel_diff']:.2e})")
    for d in res["data"]:
        lines.append(f"data {d['config']} ({d['image_size'][0]}x{d['image_size'][1]}, batch "
                     f"{d['batch_size']}, workers {d['num_workers']}): delivers "
                     f"{d['delivery_samples_s']:.1f} samples/s, step consumes "
                     f"{d['consumption_samples_s']:.1f} = {d['ratio']:.1f}x (target >= "
                     f"{d['target']}x: {verdict(d['met'])})")
    return lines


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``mtlcv bench train [--json] [--quick] ...``; result to ``out``, progress to stderr."""
    ap = argparse.ArgumentParser(prog="mtlcv bench train", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, two rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1; 0 keeps torch's default)")
    args = ap.parse_args(argv)
    try:
        res = run(args.quick, args.rounds, args.warmup, args.device, args.threads or None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stream = out or sys.stdout
    if args.json:
        print(json.dumps(res, indent=2), file=stream)
    else:
        print("\n".join(format_lines(res)), file=stream)
    return 0
