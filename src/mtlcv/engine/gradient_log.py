"""``train.log_gradients_every``: gradient conflict and TAG affinity logged during training.

Every N training steps (counted over the whole run) the trainer hands the step's batch to
:meth:`GradientLog.measure` *before* its own forward pass. It runs one more forward pass, the
per-task gradients of the shared parameters and one lookahead forward pass per task
(:mod:`mtlcv.analysis.interactions`), and keeps one record:

``{"epoch", "step", "global_step", "lr", "tasks", "shared_parameters", "loss": [T],
"grad_norm": [T], "cosine": [[T x T]], "affinity": [[T x T]]}``

(NaN becomes ``null``). Records are appended to ``gradients.jsonl`` in the run directory when
the epoch ends, before ``last.pt`` is written, and a resumed run drops the records of epochs
after its checkpoint, so the file always matches the checkpoint.

The measurement does not change training: batch norm's running statistics and every RNG state
are restored afterwards, parameters are never written (the lookahead substitutes them in a
functional call), and ``.grad`` is untouched (``autograd.grad``). A run with logging ends with
the same weights as one without (tested). It works for every architecture and balancer: it
only needs the model's split into shared and task parameters. A model without shared
parameters (single-task baselines, soft sharing by a norm penalty) has nothing to log; one
line says so.

Cost per logged step, on top of the step itself: one forward pass, T backward passes (one
batched pass where PyTorch can) and T forward passes without gradients; see
docs/analysis.md for measured ratios.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.interactions import (
    cosine_matrix,
    lookahead_affinity,
    per_task_gradients,
    shared_named_parameters,
)
from .checkpoint import atomic_write_text, rng_state, set_rng_state

FILENAME = "gradients.jsonl"


def _clean(values: Any) -> Any:
    """Nested lists of floats with NaN/inf as None (strict JSON)."""
    if isinstance(values, list):
        return [_clean(v) for v in values]
    v = float(values)
    return v if math.isfinite(v) else None


class GradientLog:
    """Measures and stores gradient conflict and lookahead affinity every ``every`` steps.

    Args:
        every: log every this many training steps (global step 0, every, 2*every, ...).
        tasks: the task names, in the order of the loss vector.
        run_dir: where ``gradients.jsonl`` goes.
        log: prints one line (used once, when the model has no shared parameters).
    """

    def __init__(
        self,
        every: int,
        tasks: Sequence[str],
        run_dir: str | Path,
        log: Callable[[str], None] = print,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.tasks = list(tasks)
        self.path = Path(run_dir) / FILENAME
        self.log = log
        self.pending: list[dict[str, Any]] = []
        self._warned = False

    def due(self, global_step: int) -> bool:
        return global_step % self.every == 0

    def measure(
        self,
        model: nn.Module,
        image: torch.Tensor,
        losses_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        lr: float,
        epoch: int,
        step: int,
        global_step: int,
    ) -> dict[str, Any] | None:
        """Measure on one batch; keep and return the record (None without shared parameters).

        ``losses_of(predictions)`` returns the per-task loss vector the balancer would see
        (deep-supervision terms included) for predictions of ``model``.
        """
        named = shared_named_parameters(model)
        if not named:
            if not self._warned:
                self.log("log_gradients_every: this model has no shared parameters; there is "
                         "no gradient conflict or task affinity to log")
                self._warned = True
            return None
        names = [n for n, _ in named]
        params = [p for _, p in named]
        rng = rng_state()
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        try:
            losses = losses_of(model(image))
            G = per_task_gradients(losses, params)
            cos = cosine_matrix(G)

            def loss_at(values: list[torch.Tensor]) -> torch.Tensor:
                subs = dict(zip(names, values))
                preds = torch.func.functional_call(model, subs, (image,), strict=False)
                return losses_of(preds)

            Z = lookahead_affinity(loss_at, params, G, losses.detach(), lr)
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
            set_rng_state(rng)
        record = {
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "lr": lr,
            "tasks": self.tasks,
            "shared_parameters": int(G.shape[1]),
            "loss": _clean(losses.detach().double().cpu().tolist()),
            "grad_norm": _clean(G.double().norm(dim=1).cpu().tolist()),
            "cosine": _clean(cos.tolist()),
            "affinity": _clean(Z.tolist()),
        }
        self.pending.append(record)
        return record

    def flush(self) -> None:
        """Append the records kept since the last flush to ``gradients.jsonl``."""
        if not self.pending:
            return
        with open(self.path, "a") as fh:
            for r in self.pending:
                fh.write(json.dumps(r) + "\n")
        self.pending = []


def truncate_log(path: str | Path, global_step: int) -> None:
    """Drop the lines of ``gradients.jsonl`` logged at ``global_step`` or later: what a run
    resumed from a checkpoint taken after ``global_step`` optimizer steps writes again."""
    path = Path(path)
    if not path.exists():
        return
    def before(line: str) -> bool:  # a torn or foreign line (no step) is dropped too
        try:
            return int(json.loads(line)["global_step"]) < global_step
        except (ValueError, KeyError, TypeError):
            return False

    keep = [line for line in path.read_text().splitlines() if line.strip() and before(line)]
    atomic_write_text("".join(line + "\n" for line in keep), path)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``gradients.jsonl`` (empty when the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
