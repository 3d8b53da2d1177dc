"""The training loop: one step is ``batch -> model -> per-task losses -> balancer -> optimizer``.

The trainer never asks which architecture, dataset or balancing method it runs: the model maps
images to ``{task: prediction}``, every task scores its own prediction, and the balancer leaves
``.grad`` set (see docs/design.md).

A run directory holds:

* ``config.yaml``: the validated config, as run;
* ``metrics.jsonl``: one JSON line per epoch (train losses, val metrics, Δm or mean rank, lr);
  it is rewritten from the checkpoint's history on resume, so it never holds an epoch twice;
* ``last.pt``: everything needed to continue exactly (model, optimizer, scheduler, balancer,
  RNG states, position in the epoch, history), written atomically after every epoch and, with
  ``train.checkpoint_every: N``, every N optimizer steps;
* ``best.pt``: the model of the best epoch on val (by Δm against the baselines when they are
  given, else by mean rank over all metrics), both over the main tasks: auxiliary tasks
  (config ``aux_tasks``) are trained and balanced but never selected on; it records what the
  model is (``meta``, :mod:`mtlcv.engine.metadata`), as ``last.pt`` does;
* ``results.json``: the test metrics of the best checkpoint (under ``eval.protocol:
  published``, the mean test metrics of the last ``eval.last_epochs`` epochs instead, see
  :mod:`mtlcv.engine.protocol`), Δm when baselines exist, the protocol that produced them, wall
  time and peak memory;
* ``.lock`` while a process writes it (:mod:`mtlcv.engine.runlock`: one writer per run);
* ``gradients.jsonl``: with ``train.log_gradients_every``, gradient conflict and TAG task
  affinity every N steps (:mod:`mtlcv.engine.gradient_log`);
* ``tb/``: TensorBoard scalars, when the ``tensorboard`` package is installed.

Resuming (``resume=True``) restores ``last.pt`` and continues where it was written, mid-epoch
included. The data order of every epoch is drawn from ``seed + epoch`` and each sample's
augmentation from ``(seed, epoch, index)``; the global RNG states are restored; so a resumed run
ends with weights bitwise equal to an uninterrupted one on CPU.

Preemption: SIGTERM (what cluster schedulers send before killing a job) lets the current step
finish, writes ``last.pt`` and raises :class:`~mtlcv.errors.Preempted` (exit code 75 in the
CLI). Several processes (``torchrun``, :mod:`mtlcv.engine.distributed`) agree on the step to
stop at; only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..analysis import delta_m, main_metrics, mean_rank, on_baseline_metrics
from ..config import ExperimentConfig, load, to_dict
from ..errors import CheckpointError, ConfigError, Preempted, TrainingError
from . import distributed
from .amp import Amp
from .checkpoint import (
    _reason,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .closures import StepContext, after_step, before_backward, check_needs
from .evaluate import Metrics, check_batch, evaluate, to_device
from .experiment import (
    Experiment,
    build,
    build_optimizer,
    build_scheduler,
    check_input_size,
    load_baselines,
    make_loader,
    optimizer_groups,
)
from .gradient_log import FILENAME as GRADIENT_LOG
from .gradient_log import GradientLog, truncate_log
from .metadata import describe as describe_model
from .protocol import (
    PUBLISHED,
    check_baseline_protocol,
    describe,
    last_epochs_average,
    tests_this_epoch,
)
from .runlock import RunLock, stale_note

#: keys of the config that may differ between a run and its resumption
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.progress",
    "train.device",
    "train.threads",
    "train.log_gradients_every",
    "train.checkpoint_every",
    "train.on_nonfinite",
    "data.num_workers",
)

#: schedules whose learning rate depends on ``train.epochs`` (cannot be extended exactly)
EPOCH_DEPENDENT_SCHEDULES = ("cosine",)


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


def _silent(_: str) -> None:
    return None


@dataclass
class EpochProgress:
    """What the current epoch has accumulated so far (saved in mid-epoch checkpoints).

    The sums live on the training device and the balancer's logs may be 0-d tensors there: the
    step never waits for the device to report a number (no host-device synchronisation per
    step); they are read once, at the end of the epoch or for a checkpoint.
    """

    sums: torch.Tensor  # per-task loss sums over the steps taken, float64
    counts: torch.Tensor  # per-task valid target elements seen (all processes), float64
    logs: dict[str, Any] = field(default_factory=dict)  # float or 0-d float64 tensor
    train_time: float = 0.0
    skipped: int = 0

    @classmethod
    def new(cls, tasks: int, device: torch.device | None = None) -> EpochProgress:
        def zeros() -> torch.Tensor:
            return torch.zeros(tasks, dtype=torch.float64, device=device)

        return cls(zeros(), zeros())

    def to(self, device: torch.device) -> EpochProgress:
        self.sums, self.counts = self.sums.to(device), self.counts.to(device)
        return self

    def float_logs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.logs.items()}

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu().clone(), "counts": self.counts.cpu().clone(),
                "logs": self.float_logs(), "train_time": self.train_time,
                "skipped": self.skipped}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> EpochProgress:
        sums = torch.as_tensor(s["sums"], dtype=torch.float64).clone()
        counts = torch.as_tensor(s.get("counts", torch.ones_like(sums)), dtype=torch.float64)
        return cls(sums, counts.clone(), dict(s["logs"]), float(s["train_time"]),
                   int(s["skipped"]))


class Trainer:
    """Trains one experiment into ``out_dir``.

    Args:
        cfg: the validated experiment config.
        out_dir: the run directory (created if missing; locked while the trainer lives).
        resume: continue from ``out_dir/last.pt`` instead of starting afresh.
        log: a function that prints one line (defaults to ``print``; silent on ranks > 0).
        command: what holds the run directory's lock, for another process's refusal message.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path,
        resume: bool = False,
        log: Callable[[str], None] = print,
        *,
        command: str = "mtlcv train",
    ) -> None:
        self.out = Path(out_dir)
        self.resume = resume
        self.lock: RunLock | None = None
        self._created: Path | None = None
        self._signal: str | None = None
        self._handlers: dict[int, Any] = {}
        self.ctx = distributed.init(cfg.train.device)
        self.main = self.ctx is None or self.ctx.is_main
        self.log = log if self.main else _silent
        try:
            # rank 0's decision: the other processes may not see the run directory at all
            self.resume = distributed.broadcast_object(bool(resume))
            self._saved_cfg = distributed.agreed(
                lambda: self._open_run_dir(cfg, command), others=False, share=True
            )
            self._setup(cfg)
            self._install_signal_handlers()
        except BaseException:
            self.close(failed=True)
            raise

    # ------------------------------------------------------------------ run directory
    def _open_run_dir(self, cfg: ExperimentConfig, command: str) -> dict[str, Any] | None:
        """Rank 0: check ``out``, create it, take its lock; the saved config when resuming."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose another --out")
        if self.resume:
            last = out / "last.pt"
            if not last.is_file():
                raise CheckpointError(f"cannot resume: {str(last)!r} does not exist")
        elif not out.exists():
            try:
                out.mkdir(parents=True)
            except FileExistsError:
                pass  # another process made it meanwhile: the lock decides
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the run directory {str(out)!r}: {_reason(exc)}"
                ) from None
            else:
                self._created = out
        try:
            self.lock = RunLock(out, command).acquire()
        except OSError as exc:
            raise ConfigError(
                f"cannot write into the run directory {str(out)!r}: {_reason(exc)}"
            ) from None
        note = stale_note(self.lock)
        if note:
            self.log(note)
        if self.resume:
            saved = self._check_resume_config(cfg)
        else:
            if (out / "last.pt").exists() or (out / "results.json").exists():
                raise ConfigError(
                    f"run directory {str(out)!r} already holds a run; pass --resume to continue "
                    "it or choose another --out"
                )
            saved = None
        for tmp in remove_stale_temporaries(out):
            self.log(f"removed {tmp.name}, left by an interrupted write")
        return saved

    def close(self, failed: bool = False) -> None:
        """Release the run directory (and the signal handlers). Idempotent."""
        for sig, handler in self._handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._handlers = {}
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self._created is not None:
            with contextlib.suppress(OSError):
                self._created.rmdir()  # only when still empty
            self._created = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ setup
    def _setup(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        ctx = self.ctx
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.seed)
        device = ctx.device if ctx is not None else None
        # rank 0 first: a dataset may render or download its cache on first use
        self.exp: Experiment = distributed.agreed(lambda: build(cfg, device=device))
        self.tasks = self.exp.tasks
        self.names = list(cfg.tasks)
        #: the tasks model selection and Δm look at (all but the auxiliary ones)
        self.main_tasks = [n for n in self.names if n not in cfg.aux_tasks]
        self.model = self.exp.model
        self.balancer = self.exp.balancer
        check_needs(self.balancer)  # a need no provider supplies fails now, not at step 1
        self.device = self.exp.device
        check_input_size(cfg, self.model, self.exp.datasets["train"], self.device)
        # speed options (docs/performance.md): memory layout, compilation, mixed precision
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            self.model.compile()  # in place: the module (its attributes, hooks) stays the same
        self.amp = Amp(cfg.train.amp, self.model, self.device)
        world = distributed.world_size()
        if ctx is not None:
            n = len(self.exp.datasets["train"])
            if n < world:
                raise ConfigError(
                    f"data: the training split has {n} samples, fewer than the {world} processes"
                )
            if cfg.train.sync_bn:  # keeps every parameter: the groups below are unchanged
                distributed.convert_sync_batchnorm(self.model)
        # the model's groups (e.g. cross-stitch units at a higher rate), then the balancer's
        # learnable parameters (no weight decay)
        self.optimizer = build_optimizer(cfg, optimizer_groups(self.model, self.balancer))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.baselines = (
            distributed.agreed(lambda: load_baselines(cfg.baselines), others=False, share=True)
            if cfg.baselines
            else None
        )
        self.higher = {n: dict(t.higher_is_better) for n, t in self.tasks.items()}
        # Δm only between numbers of one evaluation protocol (one line otherwise)
        self.baseline_protocol = (
            distributed.agreed(lambda: check_baseline_protocol(cfg), others=False, share=True)
            if self.baselines
            else None
        )
        # what the model is, stored in every checkpoint so that predict/export need nothing else
        self.meta = describe_model(cfg, self.tasks, self.exp.datasets["val"], self.model)
        if self.baselines is not None:  # fail now, not after the first epoch
            for split, base in self.baselines.items():
                missing = [t for t in self.main_tasks if t not in base]
                if missing:
                    raise ConfigError(
                        f"config key 'baselines': {cfg.baselines!r} has no {split} metrics for "
                        f"task {', '.join(missing)}"
                    )
                try:
                    delta_m({t: base[t] for t in self.main_tasks}, base, self.higher)
                except ConfigError as exc:
                    raise ConfigError(f"config key 'baselines' ({cfg.baselines}): {exc}") from None
        shard = {"rank": distributed.rank(), "world": world}
        self.val_loader = make_loader(cfg, self.exp.datasets["val"], train=False, **shard)
        self.test_loader = make_loader(cfg, self.exp.datasets["test"], train=False, **shard)
        every = cfg.train.log_gradients_every
        if every and self.ctx is not None:
            raise ConfigError(
                "train.log_gradients_every: not available with several processes (torchrun); "
                "log gradients in a single-process run"
            )
        self.gradient_log = (
            GradientLog(every, self.names, self.out, self.log) if every and self.main else None
        )
        # training state
        self.epoch = 0  # finished epochs
        self.step = 0  # steps taken in the current epoch
        self.global_step = 0
        self.progress: EpochProgress | None = None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0
        # several processes: the balancer draws from a stream shared by all of them (identical
        # updates); everything else (dropout) from a stream of each process's own
        self.shared_rng: torch.Tensor | None = None
        if ctx is not None:
            self.shared_rng = torch.get_rng_state()
            if ctx.rank > 0:
                torch.manual_seed(distributed.rank_seed(cfg.seed, ctx.rank))

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        with contextlib.suppress(ValueError, OSError):
            self._handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:  # a second signal: stop at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signal = name
        if self.main:
            print(
                f"mtlcv: {name} received; finishing the current step and saving a checkpoint",
                file=sys.stderr,
                flush=True,
            )

    def request_stop(self, reason: str = "SIGTERM") -> None:
        """Ask the trainer to stop after the current step, as SIGTERM does."""
        self._signal = reason

    # ------------------------------------------------------------------ resume
    def _check_resume_config(self, cfg: ExperimentConfig) -> dict[str, Any]:
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
        return to_dict(saved)

    def _check_resume_epochs(
        self, done: int, history: list[dict[str, Any]] | None = None
    ) -> None:
        """Refuse an epoch count the run cannot be continued to exactly, or (published protocol)
        whose last ``eval.last_epochs`` epochs include finished ones that were not tested."""
        assert self._saved_cfg is not None
        was = int(self._saved_cfg["train"]["epochs"])
        now = self.cfg.train.epochs
        where = f"cannot resume {str(self.out)!r} with train.epochs={now}"
        if now < done:
            raise ConfigError(f"{where}: the run has already trained {done} epochs")
        if now != was and done > 0 and self.cfg.schedule.name in EPOCH_DEPENDENT_SCHEDULES:
            raise ConfigError(
                f"{where}: its {self.cfg.schedule.name} schedule spans train.epochs={was} and "
                f"has set the learning rate of {done} epochs by it; keep train.epochs={was}, or "
                "start a new run with the longer schedule"
            )
        if self.cfg.eval.protocol == PUBLISHED and now != was:
            k = self.cfg.eval.last_epochs
            tested = {int(h["epoch"]) for h in history or () if "test" in h}
            untested = [e for e in range(max(1, now - k + 1), done + 1) if e not in tested]
            if untested:
                raise ConfigError(
                    f"{where}: eval.protocol published averages the test metrics of the last "
                    f"{k} epochs, but epoch(s) {', '.join(map(str, untested))} ran without a test "
                    f"evaluation (they were not among the last {k} of {was}); keep "
                    f"train.epochs={was}"
                )

    def _state(self) -> dict[str, Any]:
        """``last.pt``: plain Python values and tensors only (loadable with weights_only)."""
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "progress": None if self.progress is None else self.progress.state(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "amp": self.amp.state_dict(),
            "rng": rng_state(),
            "world_size": distributed.world_size(),
            "history": self.history,
            "best": self.best,
            "elapsed": self.elapsed,
            "meta": self.meta,
        }
        if self.ctx is not None:
            state["rng_ranks"] = distributed.gather_objects(state["rng"])
            state["shared_rng"] = self.shared_rng
        return state

    def _load_state(self, path: Path) -> None:
        ckpt = distributed.agreed(
            lambda: load_checkpoint(path, map_location="cpu"), others=False, share=True
        )
        try:
            done = int(ckpt["epoch"])
            self._check_resume_epochs(done, list(ckpt["history"]))
            world = int(ckpt.get("world_size", 1))
            if world != distributed.world_size():
                raise CheckpointError(
                    f"cannot resume {str(self.out)!r}: it was trained by {world} process(es) "
                    f"(global batch {world} x data.batch_size) and {distributed.world_size()} "
                    f"resume it; resume with --nproc-per-node {world}"
                )
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.balancer.load_state_dict(ckpt["balancer"])
            self.amp.load_state_dict(ckpt.get("amp"))
            rng = ckpt["rng"]
            if self.ctx is not None:
                rng = ckpt["rng_ranks"][self.ctx.rank]
                self.shared_rng = torch.as_tensor(ckpt["shared_rng"], dtype=torch.uint8)
            set_rng_state(rng)
            self.epoch = done
            self.step = int(ckpt.get("step", 0))
            self.global_step = int(ckpt.get("global_step", 0))
            prog = ckpt.get("progress")
            self.progress = None if prog is None else EpochProgress.from_state(prog)
            self.history = list(ckpt["history"])
            self.best = ckpt["best"]
            self.elapsed = float(ckpt["elapsed"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match this experiment "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        # the optimizer's state follows its parameters' device
        self.model.to(self.device)

    # ------------------------------------------------------------------ steps
    def _progress(self) -> Any:
        if not (self.main and self.cfg.train.progress and sys.stdout.isatty()):
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

    def train_loader(self) -> torch.utils.data.DataLoader:
        """This process's loader of the current epoch, from the current step on."""
        cfg = self.cfg
        return make_loader(
            cfg, self.exp.datasets["train"], train=True, seed=cfg.seed + self.epoch,
            epoch=self.epoch, start=self.step, rank=distributed.rank(),
            world=distributed.world_size(),
        )

    def train_epoch(self) -> tuple[dict[str, float], dict[str, float], int]:
        """The rest of the current epoch; returns mean per-task losses, balancer logs, steps.

        Writes ``last.pt`` every ``train.checkpoint_every`` steps, and stops with
        :class:`Preempted` (after writing it) when a stop was requested.
        """
        cfg = self.cfg
        loader = self.train_loader()
        total = loader.batch_sampler.batches()
        steps = total if cfg.train.max_steps is None else min(total, cfg.train.max_steps)
        if self.progress is None:
            self.progress = EpochProgress.new(len(self.names), self.device)
        prog = self.progress.to(self.device)
        self.model.train()
        bar = self._progress()
        if bar is not None:
            bar.start()
            bar_task = bar.add_task(
                f"epoch {self.epoch + 1}/{cfg.train.epochs}", total=steps, completed=self.step,
                losses="",
            )
        every = cfg.train.checkpoint_every
        try:
            start, before = time.perf_counter(), prog.train_time
            for batch in loader if self.step < steps else ():
                if self.gradient_log is not None:
                    self._log_gradients(batch)
                out = self.train_step(batch)
                self.step += 1
                self.global_step += 1
                # accumulated on the device: nothing here waits for it (see EpochProgress)
                prog.counts += self._counts.to(prog.counts.device)
                if out is None:
                    prog.skipped += 1
                else:
                    losses, step_logs = out
                    prog.sums += losses.double()
                    for k, v in step_logs.items():
                        v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                        prog.logs[k] = prog.logs.get(k, 0.0) + v / steps
                prog.train_time = before + time.perf_counter() - start
                if self.global_step == 1:
                    self._check_identical("parameters after the first step")
                if bar is not None:
                    mean = prog.sums / max(self.step - prog.skipped, 1)
                    text = " ".join(f"{n}={v:.3f}" for n, v in zip(self.names, mean.tolist()))
                    bar.update(bar_task, advance=1, losses=text)
                if self._stop_agreed:
                    self._save_last()
                    self._preempted()
                if self.step >= steps:
                    break
                if every is not None and self.global_step % every == 0:
                    self._save_last()
        finally:
            if bar is not None:
                bar.stop()
        mean = (prog.sums / max(steps - prog.skipped, 1)).tolist()
        return dict(zip(self.names, mean)), prog.float_logs(), steps

    def _log_gradients(self, batch: dict[str, Any]) -> None:
        """Gradient conflict and task affinity on this batch, every N steps (no side effects:
        the parameters, gradients and random state after it are those before it)."""
        assert self.gradient_log is not None
        if self.gradient_log.due(self.global_step):
            batch = to_device(batch, self.device)
            self.gradient_log.measure(
                self.model, batch["image"], lambda preds: self._losses(preds, batch, record=False),
                lr=self.optimizer.param_groups[0]["lr"], epoch=self.epoch + 1, step=self.step + 1,
                global_step=self.global_step,
            )

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]] | None:
        """One optimizer step on ``batch``; returns the (global) task losses and the balancer's
        logs, or None when the step was skipped (a non-finite loss with ``on_nonfinite: skip``).
        """
        # every batch: a bad label is one line, not an IndexError; checked where the loader put
        # it (the host), so that the check never waits for the device
        check_batch(batch, self.tasks)
        batch = to_device(batch, self.device)
        with self.amp.autocast():
            preds = self.model(batch["image"])
            losses = self._losses(preds, batch)
        if not torch.isfinite(losses).all():
            bad = [
                f"{n} ({v})" for n, v in zip(self.names, losses.tolist()) if not math.isfinite(v)
            ]
            where = f"epoch {self.epoch + 1} step {self.step + 1}"
            if self.cfg.train.on_nonfinite == "stop":
                raise TrainingError(
                    f"{where}: non-finite loss for {', '.join(bad)}; lower optim.lr or check the "
                    "data, or set train.on_nonfinite=skip (the last checkpoint is kept)"
                )
            msg = f"{where}: non-finite loss for {', '.join(bad)}; step skipped"
            if self.main:
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self.log(f"warning: {msg}")
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        with self._shared_rng():
            # closures a balancer uses before the update (Auto-λ: held-out batch, optimizer)
            before_backward(self.balancer, self._step_context(batch))
            step_logs = self.balancer.backward(losses, self.model) or {}
        extra = self.model.extra_loss()
        if extra is not None:
            # a function of the parameters alone, equal on every process: not averaged
            self.amp.scale_grad(extra).backward()
        if not self.amp.step_ok(list(self.model.parameters())):
            # fp16 overflow: no update, for every method alike; the scale was lowered
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        # what the balancer asked for beyond the losses (FAMO: the same batch's losses after the
        # update); nothing runs for a balancer without needs. Every process calls it: the
        # closure's losses go through _losses (global values, one all-reduce), and the balancer
        # runs in the shared random stream, as its backward did, so its state stays identical
        with self._shared_rng():
            step_logs = {**step_logs, **after_step(self.balancer, self._step_context(batch))}
        if self.ctx is not None and not self.cfg.train.sync_bn:
            # rank 0's running statistics, as DDP (after the closure's forward pass, if any)
            distributed.broadcast_buffers(self.model)
        return losses.detach(), step_logs

    @property
    def _stop_agreed(self) -> bool:
        if self.ctx is None:
            return self._signal is not None
        return self._stop_flag

    _stop_flag = False
    _counts: torch.Tensor | None = None

    #: this process's own random state while the shared stream is in use (see _shared_rng)
    _parked: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _get_rng(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = self.device.type == "cuda"
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None

    def _set_rng(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextlib.contextmanager
    def _shared_rng(self) -> Iterator[None]:
        """The random stream shared by every process (the balancer's draws)."""
        if self.ctx is None or self.shared_rng is None or self._parked is not None:
            yield
            return
        cuda = self.device.type == "cuda"
        self._parked = self._get_rng()
        self._set_rng((self.shared_rng, self._shared_cuda if cuda else None))
        try:
            yield
        finally:
            self.shared_rng, shared_cuda = self._get_rng()
            if cuda:
                self._shared_cuda = shared_cuda
            own, self._parked = self._parked, None
            self._set_rng(own)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """This process's own stream, also inside :meth:`_shared_rng` (a closure's forward pass:
        dropout draws as many numbers as this process's share of the batch needs)."""
        if self._parked is None:
            yield
            return
        shared = self._get_rng()
        self._set_rng(self._parked)
        try:
            yield
        finally:
            self._parked = self._get_rng()
            self._set_rng(shared)

    @property
    def _shared_cuda(self) -> torch.Tensor:  # the CUDA half of the shared stream (GPU only)
        if getattr(self, "_shared_cuda_state", None) is None:
            self._shared_cuda_state = torch.cuda.get_rng_state(self.device)
        return self._shared_cuda_state

    @_shared_cuda.setter
    def _shared_cuda(self, value: torch.Tensor) -> None:
        self._shared_cuda_state = value

    def _losses(
        self, preds: dict[str, torch.Tensor], batch: dict[str, Any], *, record: bool = True
    ) -> torch.Tensor:
        """Per-task losses ``[T]``: each task's final loss plus its deep-supervision terms.

        With several processes, the value of each is the loss of the global batch (bitwise the
        same everywhere) and its gradient this process's share of it (engine/distributed.py).
        ``record``: the step's own losses, whose counts and stop flag the epoch keeps; a
        balancer's closure (:mod:`mtlcv.engine.closures`) computes losses with ``record=False``.
        """
        aux = self.model.deep_supervision()
        out = []
        for n in self.names:
            task = self.tasks[n]
            loss = task.loss(preds[n], batch[n])
            for weight, pred in aux.get(n, ()):
                loss = loss + weight * task.loss(pred, batch[n])
            # fp16: the backward pass runs at the loss scale and the balancer reads the per-task
            # gradients unscaled (engine/amp.py); otherwise the loss itself
            out.append(self.amp.scale_grad(loss))
        # on the loss's device: read once per epoch, not per step (the processes' all-reduce
        # below takes them to the host)
        counts = torch.stack([torch.as_tensor(self.tasks[n].loss_count(batch[n], preds[n]))
                              .double().to(out[0].device) for n in self.names])
        if record:
            self._counts = counts
        if self.ctx is None:
            return torch.stack(out)
        T = len(out)
        counts = counts.cpu()
        values = torch.stack([v.detach().double().cpu() for v in out])
        buf = torch.cat([values * counts, counts, torch.tensor([float(self._signal is not None)],
                                                              dtype=torch.float64)])
        distributed.all_reduce(buf, "sum")
        if record:
            self._counts = buf[T : 2 * T].clone()
            self._stop_flag = bool(buf[-1] > 0)
        total = buf[T : 2 * T].clamp(min=1.0)
        global_loss = buf[:T] / total
        share = counts * distributed.world_size() / total
        terms = []
        for t, loss in enumerate(out):
            a = loss * share[t].to(loss)
            # value: exactly the global loss (a - a is 0); gradient: this process's share
            terms.append((a - a.detach()) + global_loss[t].to(loss))
        return torch.stack(terms)

    def _check_identical(self, what: str) -> None:
        if self.ctx is None:
            return
        tensors = [*self.model.parameters(), *self.model.buffers(),
                   *self.balancer.state_dict().values()]
        distributed.check_identical(
            [t for t in tensors if isinstance(t, torch.Tensor)], f"model or balancer {what}"
        )

    def _step_context(self, batch: dict[str, Any]) -> StepContext:
        def losses_of(b: dict[str, Any]) -> torch.Tensor:
            # the model's forward pass draws from this process's own stream (dropout), as the
            # step's did; the losses are global with several processes (every one calls this)
            with self._own_rng(), self.amp.autocast():
                return self._losses(self.model(b["image"]), b, record=False)

        return StepContext(batch, losses_of, heldout=self._heldout_batch, optimizer=self.optimizer)

    #: seed offset of the held-out order (``heldout_losses``), apart from the training order's
    HELDOUT_SEED = 1_000_003
    _heldout: tuple[tuple[int, int], Iterator[Any]] | None = None

    def _heldout_batch(self) -> dict[str, Any]:
        """Batch ``step`` of the training split in a second order drawn from ``seed +
        HELDOUT_SEED + epoch`` (Auto-λ's "val" batch: its official code reshuffles the training
        set). A function of (epoch, step) alone, so a resumed run draws the same batches."""
        cfg, key = self.cfg, (self.epoch, self.step)
        if self._heldout is None or self._heldout[0] != key:
            loader = make_loader(
                cfg, self.exp.datasets["train"], train=True,
                seed=cfg.seed + self.HELDOUT_SEED + self.epoch, epoch=self.epoch,
                start=self.step, rank=distributed.rank(), world=distributed.world_size(),
            )
            self._heldout = (key, iter(loader))
        it = self._heldout[1]
        batch = next(it)
        self._heldout = ((self.epoch, self.step + 1), it)
        batch = to_device(batch, self.device)
        check_batch(batch, self.tasks)
        return batch

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

    # ------------------------------------------------------------------ writing (rank 0)
    def _write(self, fn: Callable[[], None]) -> None:
        """Run a write on rank 0; a failure stops every process with rank 0's one line."""
        def run() -> None:
            if self.main:
                fn()

        distributed.agreed(run, others=False)

    def _save_last(self) -> None:
        if self.gradient_log is not None:  # every line before the checkpoint is on disk
            self._write(self.gradient_log.flush)
        state = self._state()  # every process: the RNG states are gathered
        self._write(lambda: atomic_save(state, self.out / "last.pt"))

    def _preempted(self) -> None:
        where = f"epoch {self.epoch + 1} step {self.step}" if self.step else f"epoch {self.epoch}"
        raise Preempted(
            f"stopped by {self._signal or 'a stop request'} after {where}; checkpoint saved to "
            f"{str(self.out / 'last.pt')!r}; continue with: mtlcv train --resume --out "
            f"{str(self.out)!r}"
        )

    def _write_metrics(self) -> None:
        """``metrics.jsonl`` from the history (a fresh start: empty)."""
        text = "".join(json.dumps(h) + "\n" for h in self.history)
        self._write(lambda: atomic_write_text(text, self.out / "metrics.jsonl"))

    def _append_metrics(self, record: dict[str, Any]) -> None:
        def append() -> None:
            try:
                with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise CheckpointError(
                    f"cannot write {str(self.out / 'metrics.jsonl')!r}: {_reason(exc)} (last.pt "
                    "holds the epoch; --resume rewrites this file from it)"
                ) from None

        self._write(append)

    # ------------------------------------------------------------------ run
    def fit(self, stop_after_epoch: int | None = None) -> dict[str, Any] | None:
        """Train to ``train.epochs``, then test the best checkpoint; return results.json's dict.

        ``stop_after_epoch`` ends the run early after that epoch, leaving a resumable run
        directory (as an interruption would); it returns None then. The run directory is
        released when ``fit`` returns or raises.
        """
        try:
            return self._fit(stop_after_epoch)
        finally:
            self.close()

    def _fit(self, stop_after_epoch: int | None) -> dict[str, Any] | None:
        cfg = self.cfg
        if self.resume:
            self._load_state(self.out / "last.pt")
            at = f"epoch {self.epoch}" + (f", step {self.step} of epoch {self.epoch + 1}"
                                          if self.step else "")
            self.log(f"resuming {self.out} after {at}")
        self._write(lambda: self._dump_config())
        self._write_metrics()
        if self.gradient_log is not None:  # lines after the checkpoint will be written again
            self._write(lambda: truncate_log(self.out / GRADIENT_LOG, global_step=self.global_step))
        writer = self._tensorboard()
        try:
            while self.epoch < cfg.train.epochs:
                if self._stop_agreed_now():
                    self._save_last()
                    self._preempted()
                self._run_epoch(writer)
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    return None
            return self.finish()
        finally:
            if writer is not None:
                writer.close()

    def _dump_config(self) -> None:
        text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)  # as config.dump, atomically
        try:
            atomic_write_text(text, self.out / "config.yaml")
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None

    def _stop_agreed_now(self) -> bool:
        """Every process's view of whether a stop was requested (one collective)."""
        return distributed.any_flag(self._signal is not None)

    def _run_epoch(self, writer: Any) -> None:
        """The rest of the current epoch, its evaluation and its checkpoints."""
        start = time.perf_counter()
        prior = self.progress.train_time if self.progress is not None else 0.0
        train_losses, logs, steps = self.train_epoch()
        assert self.progress is not None
        skipped, train_time = self.progress.skipped, self.progress.train_time
        for n, c in zip(self.names, self.progress.counts.tolist()):
            if c == 0 and steps > skipped:
                self.log(
                    f"warning: task {n!r} had no valid target in epoch {self.epoch + 1} (every "
                    "label ignored or value missing): its loss was 0 and it did not learn"
                )
        protocol = self.cfg.eval.protocol
        val = evaluate(self.model, self.tasks, self.val_loader, self.device, protocol,
                       progress=self._eval_progress(f"epoch {self.epoch + 1} val"))
        kpis = [self.tasks[n].kpi(val[n]) for n in self.names]
        self.balancer.on_epoch_end(self.epoch, list(train_losses.values()), kpis)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.epoch += 1
        self.step = 0
        self.progress = None
        score = self._score(val)
        record = {
            "epoch": self.epoch,
            "lr": lr,
            "train_loss": train_losses,
            "val": val,
            **score,
            "balancer": logs,
        }
        if tests_this_epoch(self.cfg, self.epoch):  # the published protocol's last epochs
            record["test"] = evaluate(
                self.model, self.tasks, self.test_loader, self.device, protocol,
                progress=self._eval_progress(f"epoch {self.epoch} test"),
            )
        self.history.append(record)
        best = self._is_best(score)
        if best:
            self.best = {"epoch": self.epoch, **score}
            state = {
                "epoch": self.epoch,
                "model": self.model.state_dict(),
                "val": val,
                "meta": self.meta,
            }
            self._write(lambda: atomic_save(state, self.out / "best.pt"))
        took = time.perf_counter() - start + prior
        self.elapsed += took
        record["time_s"] = round(took, 3)
        record["train_time_s"] = round(train_time, 3)
        record["steps"] = steps
        if skipped:
            record["skipped_steps"] = skipped
        self._save_last()
        self._append_metrics(record)
        self._log_epoch(record, best, writer)
        self._check_identical(f"state after epoch {self.epoch}")
        if self._stop_agreed_now():
            self._preempted()

    def finish(self) -> dict[str, Any]:
        """Test the best checkpoint (or, under the published protocol, average the last epochs'
        test metrics) and write results.json."""
        assert self.best is not None, "finish() before any epoch"
        world = distributed.world_size()
        averaged = None
        if self.cfg.eval.protocol == PUBLISHED:  # mean of the last epochs' test metrics
            val, test, averaged = last_epochs_average(
                self.history, self.epoch, self.cfg.eval.last_epochs
            )
        else:
            best = distributed.agreed(
                lambda: load_checkpoint(self.out / "best.pt", map_location="cpu"),
                others=False, share=True,
            )
            self.model.load_state_dict(best["model"])
            val = best["val"]
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
            "val": val,
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
        if world > 1:
            results["processes"] = world
            results["global_batch_size"] = world * self.cfg.data.batch_size
        if self.baselines is not None:
            results["baselines"] = self.cfg.baselines
            results["delta_m"] = {
                "convention": "mean over all metrics, lower is better (CAGrad/Nash-MTL/FAMO)",
                "protocol": self.cfg.eval.protocol,
                "baseline_protocol": self.baseline_protocol,
                "val": self._delta_m(val, "val"),
                "test": self._delta_m(test, "test"),
                "metrics": {
                    t: sorted(ms)
                    for t, ms in self.baselines["test"].items()
                    if t in self.main_tasks
                },
            }
        text = json.dumps(results, indent=2)
        self._write(lambda: atomic_write_text(text, self.out / "results.json"))
        return results

    # ------------------------------------------------------------------ logging
    def _tensorboard(self) -> Any:
        if not self.main:
            return None
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
        if record.get("skipped_steps"):
            parts.append(f"{record['skipped_steps']} steps skipped")
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
    *,
    command: str = "mtlcv train",
) -> dict[str, Any] | None:
    """Train ``cfg`` into ``out_dir`` (see :class:`Trainer`); return the results dict."""
    return Trainer(cfg, out_dir, resume=resume, log=log, command=command).fit()
