"""The training loop: one step is ``batch -> model -> per-task losses -> balancer -> optimizer``.

The trainer never asks which architecture, dataset or balancing method it runs: the model maps
images to ``{task: prediction}``, every task scores its own prediction, and the balancer leaves
``.grad`` set (see docs/design.md).

A run directory holds:

* ``config.yaml``: the validated config, as run;
* ``metrics.jsonl``: one JSON line per epoch (train losses, val metrics, Δm or mean rank, lr);
* ``last.pt``: everything needed to continue exactly (model, optimizer, scheduler, balancer,
  RNG states, position, history), written atomically after every epoch;
* ``best.pt``: the model of the best epoch on val (by Δm against the baselines when they are
  given, else by mean rank over all metrics), both over the main tasks: auxiliary tasks
  (config ``aux_tasks``) are trained and balanced but never selected on;
* ``results.json``: the test metrics of the best checkpoint (under ``eval.protocol:
  published``, the mean test metrics of the last ``eval.last_epochs`` epochs instead, see
  :mod:`mtlcv.engine.protocol`), Δm when baselines exist, the protocol that produced them, wall
  time and peak memory;
* ``tb/``: TensorBoard scalars, when the ``tensorboard`` package is installed.

Resuming (``resume=True``) restores ``last.pt`` and continues from the next epoch. Because the
data order of every epoch is drawn from a generator seeded with ``seed + epoch`` and the global
RNG states are restored, a resumed run ends with weights bitwise equal to an uninterrupted one
on CPU.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..analysis import delta_m, main_metrics, mean_rank, on_baseline_metrics
from ..config import ExperimentConfig, dump, load, to_dict
from ..errors import CheckpointError, ConfigError, TrainingError
from .checkpoint import (
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .closures import StepContext, after_step, check_needs
from .evaluate import Metrics, check_batch, evaluate, to_device
from .experiment import (
    Experiment,
    build,
    build_optimizer,
    build_scheduler,
    load_baselines,
    make_loader,
    optimizer_groups,
)
from .metadata import describe as describe_model
from .protocol import (
    PUBLISHED,
    check_baseline_protocol,
    describe,
    last_epochs_average,
    tests_this_epoch,
)

#: keys of the config that may differ between a run and its resumption
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.progress",
    "train.device",
    "train.threads",
    "data.num_workers",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class Trainer:
    """Trains one experiment into ``out_dir``.

    Args:
        cfg: the validated experiment config.
        out_dir: the run directory (created if missing).
        resume: continue from ``out_dir/last.pt`` instead of starting afresh.
        log: a function that prints one line (defaults to ``print``).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path,
        resume: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self.out = Path(out_dir)
        self.log = log
        self.resume = resume
        last = self.out / "last.pt"
        if resume:
            if not last.is_file():
                raise CheckpointError(f"cannot resume: {str(last)!r} does not exist")
            cfg = self._check_resume_config(cfg)
        elif last.exists() or (self.out / "results.json").exists():
            raise ConfigError(
                f"run directory {str(self.out)!r} already holds a run; pass --resume to continue "
                "it or choose another --out"
            )
        self.cfg = cfg
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.seed)
        self.exp: Experiment = build(cfg)
        self.tasks = self.exp.tasks
        self.names = list(cfg.tasks)
        #: the tasks model selection and Δm look at (all but the auxiliary ones)
        self.main = [n for n in self.names if n not in cfg.aux_tasks]
        self.model = self.exp.model
        self.balancer = self.exp.balancer
        check_needs(self.balancer)  # a need no provider supplies fails now, not at step 1
        self.device = self.exp.device
        # the model's groups (e.g. cross-stitch units at a higher rate), then the balancer's
        # learnable parameters (no weight decay)
        self.optimizer = build_optimizer(cfg, optimizer_groups(self.model, self.balancer))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.baselines = load_baselines(cfg.baselines) if cfg.baselines else None
        self.higher = {n: dict(t.higher_is_better) for n, t in self.tasks.items()}
        # Δm only between numbers of one evaluation protocol (one line otherwise)
        self.baseline_protocol = check_baseline_protocol(cfg) if self.baselines else None
        # what the model is, stored in every checkpoint so that predict/export need nothing else
        self.meta = describe_model(cfg, self.tasks, self.exp.datasets["val"], self.model)
        if self.baselines is not None:  # fail now, not after the first epoch
            for split, base in self.baselines.items():
                missing = [t for t in self.main if t not in base]
                if missing:
                    raise ConfigError(
                        f"config key 'baselines': {cfg.baselines!r} has no {split} metrics for "
                        f"task {', '.join(missing)}"
                    )
                try:
                    delta_m({t: base[t] for t in self.main}, base, self.higher)
                except ConfigError as exc:
                    raise ConfigError(f"config key 'baselines' ({cfg.baselines}): {exc}") from None
        self.val_loader = make_loader(cfg, self.exp.datasets["val"], train=False)
        self.test_loader = make_loader(cfg, self.exp.datasets["test"], train=False)
        # training state
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0

    # ------------------------------------------------------------------ resume
    def _check_resume_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        saved = load(self.out / "config.yaml")
        a, b = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
        for key in sorted(set(a) | set(b)):
            if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
                continue
            raise ConfigError(
                f"cannot resume {str(self.out)!r}: config key {key!r} is {b.get(key)!r} but the "
                f"run was started with {a.get(key)!r} (only {', '.join(RESUMABLE_CHANGES)} may "
                "change)"
            )
        return cfg

    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "best": self.best,
            "elapsed": self.elapsed,
            "meta": self.meta,
        }

    def _load_state(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.balancer.load_state_dict(ckpt["balancer"])
            set_rng_state(ckpt["rng"])
            self.epoch = int(ckpt["epoch"])
            self.history = list(ckpt["history"])
            self.best = ckpt["best"]
            self.elapsed = float(ckpt["elapsed"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match this experiment "
                f"({str(exc).splitlines()[0]})"
            ) from None

    # ------------------------------------------------------------------ steps
    def _progress(self) -> Any:
        if not (self.cfg.train.progress and sys.stdout.isatty()):
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            transient=True,
        )

    def _eval_progress(self, description: str) -> str | None:
        """Evaluation shows a progress bar (on a terminal) when training does."""
        return description if self.cfg.train.progress else None

    def train_epoch(self) -> tuple[dict[str, float], dict[str, float], int]:
        """One pass over the training split; returns mean per-task losses, balancer logs, steps."""
        cfg = self.cfg
        loader = make_loader(
            cfg, self.exp.datasets["train"], train=True, seed=cfg.seed + self.epoch
        )
        steps = (
            len(loader) if cfg.train.max_steps is None else min(len(loader), cfg.train.max_steps)
        )
        self.model.train()
        sums = torch.zeros(len(self.names), dtype=torch.float64)
        logs: dict[str, float] = {}
        bar = self._progress()
        if bar is not None:
            bar.start()
            bar_task = bar.add_task(
                f"epoch {self.epoch + 1}/{cfg.train.epochs}", total=steps, losses=""
            )
        try:
            for step, batch in enumerate(loader):
                if step >= steps:
                    break
                batch = to_device(batch, self.device)
                if step == 0:
                    check_batch(batch, self.tasks)
                preds = self.model(batch["image"])
                losses = self._losses(preds, batch)
                if not torch.isfinite(losses).all():
                    bad = [n for n, v in zip(self.names, losses.tolist()) if not math.isfinite(v)]
                    raise TrainingError(
                        f"epoch {self.epoch + 1} step {step + 1}: non-finite loss for "
                        f"{', '.join(bad)}; lower optim.lr or check the data (the last "
                        "finished epoch is saved)"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                step_logs = self.balancer.backward(losses, self.model) or {}
                extra = self.model.extra_loss()
                if extra is not None:
                    extra.backward()
                self.optimizer.step()
                # what the balancer asked for beyond the losses (FAMO: the same batch's losses
                # after the update); nothing runs for a balancer without needs
                step_logs = {**step_logs, **after_step(self.balancer, self._step_context(batch))}
                sums += losses.detach().double().cpu()
                for k, v in step_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / steps
                if bar is not None:
                    mean = sums / (step + 1)
                    text = " ".join(f"{n}={v:.3f}" for n, v in zip(self.names, mean.tolist()))
                    bar.update(bar_task, advance=1, losses=text)
        finally:
            if bar is not None:
                bar.stop()
        mean = (sums / max(steps, 1)).tolist()
        return dict(zip(self.names, mean)), logs, steps

    def _losses(self, preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Per-task losses ``[T]``: each task's final loss plus its deep-supervision terms."""
        aux = self.model.deep_supervision()
        out = []
        for n in self.names:
            task = self.tasks[n]
            loss = task.loss(preds[n], batch[n])
            for weight, pred in aux.get(n, ()):
                loss = loss + weight * task.loss(pred, batch[n])
            out.append(loss)
        return torch.stack(out)

    def _step_context(self, batch: dict[str, Any]) -> StepContext:
        return StepContext(batch, lambda b: self._losses(self.model(b["image"]), b))

    def _delta_m(self, metrics: Metrics, split: str) -> float:
        """Δm of the main tasks against the baselines of ``split``."""
        assert self.baselines is not None
        base = self.baselines[split]
        main = main_metrics(metrics, self.cfg.aux_tasks)
        return delta_m(on_baseline_metrics(main, base), base, self.higher)

    def _score(self, val: Metrics) -> dict[str, Any]:
        """Δm on val against the baselines, when they exist."""
        if self.baselines is None:
            return {}
        return {"delta_m": self._delta_m(val, "val")}

    def _is_best(self, score: dict[str, Any]) -> bool:
        if self.best is None:
            return True
        if "delta_m" in score:
            return score["delta_m"] < self.best["delta_m"]
        # mean rank over all epochs so far; compare this epoch with the kept best one
        aux = self.cfg.aux_tasks
        ranks = mean_rank([main_metrics(h["val"], aux) for h in self.history], self.higher)
        return ranks[-1] < ranks[self.best["epoch"] - 1]

    # ------------------------------------------------------------------ run
    def fit(self, stop_after_epoch: int | None = None) -> dict[str, Any] | None:
        """Train to ``train.epochs``, then test the best checkpoint; return results.json's dict.

        ``stop_after_epoch`` ends the run early after that epoch, leaving a resumable run
        directory (as an interruption would); it returns None then.
        """
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._load_state(self.out / "last.pt")
            self.log(f"resuming {self.out} after epoch {self.epoch}")
            self._truncate_metrics()
        dump(cfg, self.out / "config.yaml")
        writer = self._tensorboard()
        while self.epoch < cfg.train.epochs:
            start = time.perf_counter()
            train_losses, logs, steps = self.train_epoch()
            train_time = time.perf_counter() - start
            protocol = cfg.eval.protocol
            val = evaluate(self.model, self.tasks, self.val_loader, self.device, protocol,
                           progress=self._eval_progress(f"epoch {self.epoch + 1} val"))
            kpis = [self.tasks[n].kpi(val[n]) for n in self.names]
            self.balancer.on_epoch_end(self.epoch, list(train_losses.values()), kpis)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.epoch += 1
            score = self._score(val)
            record = {
                "epoch": self.epoch,
                "lr": lr,
                "train_loss": train_losses,
                "val": val,
                **score,
                "balancer": logs,
            }
            if tests_this_epoch(cfg, self.epoch):  # the published protocol's last epochs
                record["test"] = evaluate(
                    self.model, self.tasks, self.test_loader, self.device, protocol
                )
            self.history.append(record)
            best = self._is_best(score)
            if best:
                self.best = {"epoch": self.epoch, **score}
                atomic_save(
                    {
                        "epoch": self.epoch,
                        "model": self.model.state_dict(),
                        "val": val,
                        "meta": self.meta,
                    },
                    self.out / "best.pt",
                )
            self.elapsed += time.perf_counter() - start
            record["time_s"] = round(time.perf_counter() - start, 3)
            record["train_time_s"] = round(train_time, 3)
            record["steps"] = steps
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            atomic_save(self._state(), self.out / "last.pt")
            self._log_epoch(record, best, writer)
            if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                if writer is not None:
                    writer.close()
                return None
        if writer is not None:
            writer.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Test the best checkpoint and write results.json."""
        assert self.best is not None, "finish() before any epoch"
        best = load_checkpoint(self.out / "best.pt", map_location=self.device)
        averaged = None
        if self.cfg.eval.protocol == PUBLISHED:  # mean of the last epochs' test metrics
            val, test, averaged = last_epochs_average(
                self.history, self.epoch, self.cfg.eval.last_epochs
            )
            best = {**best, "val": val}
        else:
            self.model.load_state_dict(best["model"])
            test = evaluate(self.model, self.tasks, self.test_loader, self.device,
                            progress=self._eval_progress("test"))
        results: dict[str, Any] = {
            "name": self.cfg.name,
            "tasks": self.names,
            "aux_tasks": list(self.cfg.aux_tasks),
            "higher_is_better": self.higher,
            "arch": self.cfg.model.arch,
            "balancer": self.cfg.balancer.name,
            "best_epoch": self.best["epoch"],
            "epochs": self.epoch,
            "selection": (
                f"mean of epochs {averaged[0]}-{averaged[-1]}" if averaged
                else "delta_m" if self.baselines else "mean_rank"
            ),
            "protocol": describe(self.cfg, self.tasks, averaged),
            "val": best["val"],
            "test": test,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "wall_time_s": round(self.elapsed, 2),
            # training only (data, forward, balancer backward, optimizer), without evaluation
            "step_time_s": round(
                sum(h["train_time_s"] for h in self.history)
                / max(1, sum(h["steps"] for h in self.history)),
                4,
            ),
            "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
            "device": str(self.device),
        }
        if self.baselines is not None:
            results["baselines"] = self.cfg.baselines
            results["delta_m"] = {
                "convention": "mean over all metrics, lower is better (CAGrad/Nash-MTL/FAMO)",
                "protocol": self.cfg.eval.protocol,
                "baseline_protocol": self.baseline_protocol,
                "val": self._delta_m(best["val"], "val"),
                "test": self._delta_m(test, "test"),
                "metrics": {
                    t: sorted(ms) for t, ms in self.baselines["test"].items() if t in self.main
                },
            }
        atomic_write_text(json.dumps(results, indent=2), self.out / "results.json")
        return results

    # ------------------------------------------------------------------ logging
    def _truncate_metrics(self) -> None:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= self.epoch
        ]
        atomic_write_text("".join(line + "\n" for line in keep), path)

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _log_epoch(self, record: dict[str, Any], best: bool, writer: Any) -> None:
        parts = [f"epoch {record['epoch']}/{self.cfg.train.epochs}"]
        parts.append("loss " + " ".join(f"{n}={v:.4f}" for n, v in record["train_loss"].items()))
        for n in self.names:
            task = self.tasks[n]
            shown = task.primary_metrics[:2] or tuple(record["val"][n])[:2]
            parts.append(" ".join(f"{n}.{m}={record['val'][n][m]:.4g}" for m in shown))
        if "delta_m" in record:
            parts.append(f"Δm={record['delta_m']:+.2f}%")
        parts.append(f"{record['time_s']:.1f}s" + (" *best" if best else ""))
        self.log(" | ".join(parts))
        if writer is not None:
            e = record["epoch"]
            for n, v in record["train_loss"].items():
                writer.add_scalar(f"train_loss/{n}", v, e)
            for n, ms in record["val"].items():
                for m, v in ms.items():
                    writer.add_scalar(f"val/{n}/{m}", v, e)
            if "delta_m" in record:
                writer.add_scalar("val/delta_m", record["delta_m"], e)


def train(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train ``cfg`` into ``out_dir`` (see :class:`Trainer`); return the results dict."""
    return Trainer(cfg, out_dir, resume=resume, log=log).fit()
