"""Data-parallel training over processes started by ``torchrun`` (gloo on CPU, nccl on GPU).

``torchrun --nproc-per-node N -m mtlcv train --config C --out D`` starts N processes; each reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment and :func:`init` joins them into
one process group. Without those variables (or with ``WORLD_SIZE=1``) nothing here does anything
and training is exactly the single-process code path. See ``docs/distributed.md``.

What a step means with N processes and ``data.batch_size = b``: the global batch is ``N b``
samples, the same ones a single process with batch ``N b`` would take
(:class:`ShardedBatchSampler`), and every process applies the same update, the one that single
process would apply:

* **Losses.** Every task loss is a mean over its *valid* elements (labelled pixels, pixels with
  depth). The global loss is ``sum_r n_r L_r / sum_r n_r`` (``n_r``: process r's count,
  :meth:`mtlcv.tasks.base.Task.loss_count`), not the mean of the per-process means, which differs
  when the counts differ. The trainer all-reduces the counts and the loss values once per step
  and gives the balancer losses whose *value* is the global loss (bitwise the same on every
  process) and whose *gradient* is process r's share ``n_r N / sum_s n_s * grad L_r``, so that the
  mean over processes of the gradients is the gradient of the global loss.
* **Loss weighting** (:class:`~mtlcv.balancing.base.Weighting`): weights come from the global
  loss values, so they are equal on every process; the gradients are then averaged
  (:func:`sync_gradients`), as plain DDP does.
* **Gradient methods** (:class:`~mtlcv.balancing.base.GradientBalancer`) must aggregate the
  *global* per-task gradients, as aggregation is not linear. In ``"param"`` mode the per-task
  gradient matrix ``G`` (T x P) is all-reduced (averaged) before aggregating: every process then
  computes the same weights and the same update, and only the heads' gradients are averaged
  afterwards. Cost: T P numbers all-reduced per step instead of plain DDP's P (T times the
  traffic), plus forming ``G`` (the Gramian-only memory saving of jacobian.py is not used). The
  Gramian cannot be all-reduced instead: ``(sum_r G_r)(sum_r G_r)^T`` has cross terms that no
  process has. In ``"rep"`` mode the columns of ``G`` belong to each process's own samples, so the
  global ``G`` is the concatenation of the processes' blocks: it is all-gathered (T x global
  batch x representation size numbers per step), aggregated identically everywhere, and each
  process backpropagates its own block of the update.
* **Batch normalisation.** With ``train.sync_bn`` (default true) every BatchNorm layer uses the
  statistics of the global batch (:class:`SyncBatchNorm`, which unlike ``torch.nn.SyncBatchNorm``
  also runs on CPU with gloo): two small all-reduces per layer forward and per backward pass.
  Without it each process normalises with its own batch's statistics, as in plain DDP.
* **Randomness.** Data augmentation is drawn per sample from ``(seed, epoch, index)`` (see
  ``experiment.make_loader``), so it does not depend on the number of processes. Model
  randomness (dropout) draws from a per-process stream; the balancer's randomness (PCGrad's task
  order, RLW's weights, GradDrop's masks) from a stream shared by all processes, so that they
  stay identical.
* **Metrics** are reduced exactly: every process evaluates its own shard of the split, a
  contiguous run of the batches one process would form (no sample twice, none padded), the
  metrics' states (confusion matrices, sums, the normals' angles for the exact median, the
  detections for COCO mAP, the published protocol's per-batch values) are gathered to rank 0
  and merged in rank order, i.e. in the split's order, and the numbers broadcast back.

Only rank 0 writes the run directory; checkpoints hold the other processes' RNG states too.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from .. import errors as _errors
from ..errors import ConfigError, MtlcvError, TrainingError

T_ = TypeVar("T_")


@dataclass
class Context:
    """The process group this process belongs to."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ctx: Context | None = None


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first start)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def init(device: str = "auto") -> Context | None:
    """Join the process group torchrun describes; None for a single process.

    ``device`` is ``train.device``: ``auto`` and ``cuda`` give each process the GPU
    ``cuda:LOCAL_RANK`` and nccl; ``cpu`` gives gloo. Idempotent.
    """
    global _ctx
    if _ctx is not None:
        return _ctx
    world = env_world_size()
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - every official build has it
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch has no torch.distributed")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config key 'train.device': cuda was asked for but none is available")
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        minutes = float(os.environ.get("MTLCV_DIST_TIMEOUT_MIN", "30"))
        timeout = datetime.timedelta(minutes=minutes)
        # the store torchrun's agent keeps may still hold the keys (process addresses) of the
        # workers of an earlier attempt; a prefix per restart keeps the new group from reading
        # a dead worker's address
        store, r, w = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"mtlcv/attempt{restart_count()}/", store)
        dist.init_process_group(backend, store=store, rank=r, world_size=w, timeout=timeout)
    _ctx = Context(rank, world, local, backend, dev)
    return _ctx


def shutdown() -> None:
    """Leave the process group (end of training)."""
    global _ctx
    if _ctx is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _ctx = None


def context() -> Context | None:
    return _ctx


def active() -> bool:
    """True in a process group of more than one process."""
    return _ctx is not None


def rank() -> int:
    return 0 if _ctx is None else _ctx.rank


def world_size() -> int:
    return 1 if _ctx is None else _ctx.world


def is_main() -> bool:
    return _ctx is None or _ctx.rank == 0


# ---------------------------------------------------------------------- collectives
def _dist():
    import torch.distributed as dist

    return dist


def _comm_device(t: torch.Tensor) -> torch.Tensor:
    """nccl reduces GPU tensors only; gloo both."""
    assert _ctx is not None
    if _ctx.backend == "nccl" and t.device.type != "cuda":
        return t.to(_ctx.device)
    return t


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` over all processes, in place; ``op``: sum, mean, max or min. Returns ``t``."""
    if _ctx is None:
        return t
    dist = _dist()
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
           "min": dist.ReduceOp.MIN}
    buf = _comm_device(t)
    dist.all_reduce(buf, op=ops[op])
    if op == "mean":
        buf /= _ctx.world
    if buf is not t:
        t.copy_(buf)
    return t


def broadcast_object(obj: T_, src: int = 0) -> T_:
    """``obj`` of rank ``src`` on every process (pickled)."""
    if _ctx is None:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, device=_ctx.device if _ctx.backend == "nccl"
                                  else None)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` on rank 0 (in rank order); None on the others."""
    if _ctx is None:
        return [obj]
    out = [None] * _ctx.world if _ctx.rank == 0 else None
    _dist().gather_object(obj, out, dst=0)
    return out


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Concatenate every process's ``t`` along ``dim`` (sizes may differ along ``dim``).

    Returns the concatenation and this process's ``(start, stop)`` along ``dim``.
    """
    if _ctx is None:
        return t, (0, t.shape[dim])
    dist = _dist()
    size = _comm_device(torch.tensor([t.shape[dim]], dtype=torch.long))
    sizes = [torch.zeros_like(size) for _ in range(_ctx.world)]
    dist.all_gather(sizes, size)
    n = [int(s.item()) for s in sizes]
    top = max(n)
    pad = list(t.shape)
    pad[dim] = top - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim) if pad[dim] else t.contiguous()
    padded = _comm_device(padded)
    parts = [torch.empty_like(padded) for _ in range(_ctx.world)]
    dist.all_gather(parts, padded)
    parts = [p.narrow(dim, 0, k).to(t.device) for p, k in zip(parts, n)]
    start = sum(n[: _ctx.rank])
    return torch.cat(parts, dim), (start, start + n[_ctx.rank])


def sync_gradients(params: Iterable[torch.Tensor], op: str = "mean",
                   bucket_elements: int = 1 << 24) -> None:
    """All-reduce the ``.grad`` of ``params`` (``mean`` or ``sum``), flattened in buckets.

    A gradient that is None on some processes and not on others is treated as zeros there;
    one that is None everywhere stays None.
    """
    if _ctx is None:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    all_reduce(has, "max")
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in live + [None]:  # type: ignore[list-item]
        if p is not None and (not bucket or (p.grad.dtype == bucket[0].grad.dtype
                                             and p.grad.device == bucket[0].grad.device
                                             and size + p.numel() <= bucket_elements)):
            bucket.append(p)
            size += p.numel()
            continue
        if bucket:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            all_reduce(flat, op)
            i = 0
            for q in bucket:
                q.grad.copy_(flat[i : i + q.numel()].view_as(q.grad))
                i += q.numel()
        bucket, size = ([p], p.numel()) if p is not None else ([], 0)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s buffers (BatchNorm running statistics) of rank ``src`` to every process,
    as ``DistributedDataParallel(broadcast_buffers=True)`` does; used without ``train.sync_bn``,
    where each process's statistics come from its own samples."""
    if _ctx is None:
        return
    dist = _dist()
    for b in module.buffers():
        buf = _comm_device(b.data)
        dist.broadcast(buf, src=src)
        if buf is not b.data:
            b.data.copy_(buf)


def agreed(fn: Callable[[], T_], *, others: bool = True, share: bool = False) -> T_:
    """Run ``fn`` on rank 0 first; if it raises an MtlcvError every process raises it (one line,
    same class), so no process is left waiting in a collective. Then the other processes run
    ``fn`` too (``others``; e.g. building the datasets after rank 0 rendered their cache), or,
    with ``share``, receive rank 0's result (e.g. a checkpoint only rank 0 can read).
    """
    if _ctx is None:
        return fn()
    err = None
    result: Any = None
    if _ctx.rank == 0:
        try:
            result = fn()
        except MtlcvError as exc:
            err = (type(exc).__name__, str(exc), getattr(exc, "exit_code", 2))
    err = broadcast_object(err)
    if err is not None:
        raise _rebuild_error(*err)
    if share:
        result = broadcast_object(result if _ctx.rank == 0 else None)
    elif others and _ctx.rank != 0:
        result = fn()
    return result


def _rebuild_error(name: str, message: str, exit_code: int) -> MtlcvError:
    cls = getattr(_errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MtlcvError)):
        from . import runlock

        cls = getattr(runlock, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MtlcvError)):
        cls = MtlcvError
    exc = cls(message)
    exc.exit_code = exit_code
    exc.agreed = True  # type: ignore[attr-defined]  # rank 0 raised (and reports) it too
    return exc


def any_flag(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any."""
    if _ctx is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce(t, "max").item() > 0)


def checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers that differ, almost surely, when any of ``tensors`` differs."""
    s = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):
        v = t.detach().reshape(-1).double().cpu()
        if v.numel() == 0:
            continue
        w = torch.arange(1, v.numel() + 1, dtype=torch.float64)
        v = torch.nan_to_num(v, nan=1.2345e300, posinf=1e300, neginf=-1e300)
        s[0] += (v * w).sum() * (i + 1)
        s[1] += v.square().sum()
    return s


def check_identical(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Raise TrainingError on every process when ``tensors`` differ between processes."""
    if _ctx is None:
        return
    s = checksum(tensors)
    lo, hi = s.clone(), s.clone()
    all_reduce(lo, "min")
    all_reduce(hi, "max")
    if not torch.equal(lo, hi):
        raise TrainingError(
            f"the {what} differ between the {_ctx.world} processes; a component (balancer, "
            "architecture) does not synchronise its gradients or state (see docs/distributed.md)"
        )


# ---------------------------------------------------------------------- metrics
def merge_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: metric}`` accumulated on each process's shard -> the computed split metrics.

    Rank 0 gathers every process's metric state (:meth:`mtlcv.tasks.base.Metric.state`), merges
    it into its own in rank order, computes, and broadcasts the numbers.
    """
    if _ctx is None:
        return {name: m.compute() for name, m in metrics.items()}
    states = gather_objects({name: m.state() for name, m in metrics.items()})
    result = None
    if _ctx.rank == 0:
        assert states is not None
        for other in states[1:]:
            for name, m in metrics.items():
                m.merge(other[name])
        result = {name: m.compute() for name, m in metrics.items()}
    return broadcast_object(result)


# ---------------------------------------------------------------------- data
def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s own random stream (dropout), for ``rank > 0``."""
    ss = np.random.SeedSequence([int(seed) % 2**64, 2**32 + int(rank)])
    return int(ss.generate_state(1, np.uint64)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` (64 bits, well mixed)."""
    ss = np.random.SeedSequence([int(seed) % 2**64, int(epoch), int(index)])
    return int(ss.generate_state(1, np.uint64)[0])


class SampleSeeded(torch.utils.data.Dataset):
    """``dataset[i]`` drawn with torch's RNG seeded from ``(seed, epoch, i)``, the global state
    left untouched: augmentation is a function of the sample, not of the process, the worker or
    the position in the epoch (exact mid-epoch resume, any number of processes or workers)."""

    def __init__(self, dataset: Any, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            return self.dataset[i]


class ShardedBatchSampler(Sampler[list[int]]):
    """This process's part of each global batch of one epoch.

    The epoch's order is ``torch.randperm(n)`` from a generator seeded with ``seed`` (or
    ``0..n-1`` without shuffling). Global batch ``k`` is ``order[k B : (k+1) B]`` with
    ``B = batch_size * world``; process ``r`` takes its ``r``-th contiguous part (``batch_size``
    samples; a short last batch is split as evenly as possible). With ``world = 1`` these are the
    batches of a plain shuffled DataLoader of batch ``B``. ``start`` skips the first global
    batches (mid-epoch resume). ``drop_last`` (default: when ``n > B``) drops a short last batch.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 world: int = 1, rank: int = 0, start: int = 0,
                 drop_last: bool | None = None) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.world, self.rank, self.start = world, rank, start
        self.global_batch = batch_size * world
        self.drop_last = n > self.global_batch if drop_last is None else drop_last

    def batches(self) -> int:
        """Global batches in the epoch (before ``start``)."""
        B = self.global_batch
        return self.n // B if self.drop_last else math.ceil(self.n / B)

    def __len__(self) -> int:
        return max(0, self.batches() - self.start)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(int(self.seed) % 2**64)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order, B = self.order(), self.global_batch
        for k in range(self.start, self.batches()):
            batch = order[k * B : (k + 1) * B]
            yield split_evenly(batch, self.world)[self.rank]


def split_evenly(items: Sequence[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` contiguous runs whose sizes differ by at most one (larger first)."""
    q, r = divmod(len(items), parts)
    out, i = [], 0
    for k in range(parts):
        j = i + q + (1 if k < r else 0)
        out.append(list(items[i:j]))
        i = j
    return out


# ---------------------------------------------------------------------- batch norm
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = x.clone(memory_format=torch.contiguous_format)
        return all_reduce(y, "sum")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return all_reduce(g.clone(memory_format=torch.contiguous_format), "sum")


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch of all processes (Ioffe & Szegedy, ICML 2015,
    Algorithm 1, with the statistics of every process's samples).

    In training mode the per-channel mean and (biased) variance are computed over all processes:
    the sum and the count first, then the sum of squared deviations from the global mean (two
    passes, as numerically sound as a single process's batch norm); both sums go through a
    differentiable all-reduce, so backward passes sum the statistics' gradients over processes
    too. The running mean and the unbiased running variance are updated with the global
    statistics, so they stay identical on every process and equal to those of one process with
    the whole batch. Outside a process group, and in eval mode, it is ``nn.BatchNorm``.
    Works with any backend (gloo on CPU, nccl on GPU), unlike ``torch.nn.SyncBatchNorm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.full((1,), float(x.numel() // max(x.shape[1], 1)), dtype=torch.float64,
                           device=x.device)
        # the count travels with the sums: one all-reduce for both
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims, dtype=torch.float64), count]))
        n = float(sums[-1].item())
        if n <= 1:
            raise ValueError(
                f"SyncBatchNorm: expected more than 1 value per channel over all processes, got {n}"
            )
        mean = sums[:-1] / n
        xc = x - mean.to(x.dtype).view(shape)
        var = _AllReduceSum.apply((xc * xc).sum(dims, dtype=torch.float64)) / n
        inv = torch.rsqrt(var + self.eps).to(x.dtype)
        y = xc * inv.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var.detach() * (n / (n - 1))
                self.running_mean.mul_(1 - m).add_(m * mean.detach().to(self.running_mean))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var))
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm*d`` in ``module`` by a :class:`SyncBatchNorm` holding the same
    parameters and buffers (state-dict keys unchanged, so checkpoints load either way)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (SyncBatchNorm, nn.SyncBatchNorm)
    ):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        new.to(next(iter(module.buffers()), torch.empty(0)).device)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
