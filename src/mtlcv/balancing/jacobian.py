"""Per-task gradients, computed once for every gradient method.

A gradient method needs the matrix ``G`` (tasks x columns) of per-task gradients, in one of two
spaces (``mode``):

* ``"param"``: the gradients of every task loss with respect to the **shared parameters**. This is
  the space in which every method is defined, so it is *exact* for all of them.
* ``"rep"``: the gradients with respect to the **shared representation** ``z`` (the MGDA-UB
  shortcut, Sener & Koltun 2018, sec. 3.3; LibMTL's ``rep_grad``). The method's update ``d_z`` is
  then backpropagated through the encoder (``z.backward(d_z)``). Exact for MGDA-UB and for GradDrop
  (both are *defined* at the representation); for every other method it is an approximation, as
  the encoder Jacobian does not preserve the geometry of the task gradients.

Default mode per method: ``"rep"`` for mgda-ub and graddrop (exact: both are defined at the
representation); ``"param"`` (exact) for pcgrad, mgda, cagrad, nashmtl, imtl-g, imtl,
aligned-mtl, upgrad, gradvac and dbmtl. Any of them accepts ``mode="rep"`` (LibMTL's
``rep_grad``), which is then an approximation; ``mgda`` with ``mode="rep"`` *is* MGDA-UB.

Cost. A plain ``sum(losses).backward()`` runs each head once and the encoder once. Here, with a
model that has a representation (``model.has_representation``, ``model.representation`` set by
the last forward), the heads are still run once each: one small ``autograd.grad`` per task gives
``dL_t/dz`` and the head's own gradient, starting at task t's own loss (an edge of the trainer's
``torch.stack``; starting at ``losses[t]`` would run every head) and never entering the encoder.
In ``"param"`` mode the encoder part of ``G`` then comes from **one backward pass per task**
through the encoder alone, from ``z`` with the cotangent ``c_t dL_t/dz``: T encoder passes are
the floor for exact per-task gradients. (``autograd.grad(..., is_grads_batched=True)`` runs the
same T passes: its legacy vmap has no batching rule for the backward of convolution, batch norm
or max pooling and loops over the tasks, holding all T intermediate gradients at once; measured
on ResNet-18 it was slower than the plain loop.) In ``"rep"`` mode the encoder is run backwards
exactly once, as in plain training. Each part of the graph is freed as soon as it has been used,
so no activation outlives the step. Models without a representation (or whose heads also use
shared parameters or other tasks' parameters, which a walk of the heads' graph detects) are
computed in ``"param"`` mode whatever the method asks, with the whole Jacobian from one batched
VJP of the loss vector with one-hot cotangents. Whenever batching fails (an operator without a
vmap rule) a loop of T ``autograd.grad`` calls is used.

Memory. ``G`` has T times as many entries as the shared parameters (10 tasks on ResNet-18:
450 MB, more than a whole plain training step). Most methods only weigh the Gramian ``G G^T``
(``GradientBalancer.gramian_weights``); for them ``G`` is never formed (``gramian=True``): the
encoder's graph is cut at the nodes every path goes through (layer and residual-block
boundaries, :func:`encoder_segments`) and walked down segment by segment, one pass per task and
segment, so that only one group of parameters' T rows exists at a time (at most half a
gradient's worth, or one parameter tensor); each group is added to the Gramian and dropped. The
bottom segments, once all T rows below a cut fit in one gradient's worth of memory, are done in
one pass per task and kept. The update ``w @ G`` is then ``w @ K`` for the kept rows and, for
the dropped ones, ``z``'s VJP with ``sum_t w_t c_t dL_t/dz``: one more backward pass, through the
top segments only (:meth:`TaskGradients.apply_weights`). DB-MTL folds each task's row into its
moving average as it is computed (``on_row``); GradDrop in ``"param"`` mode gets ``G``.

Task-specific parameters. A head's parameters get the gradient of their own task's loss, scaled
by the method's weight of that task when the method's update is such a weighted sum (MGDA,
MGDA-UB, Nash-MTL: their official code backpropagates ``sum_t w_t L_t`` through the whole network)
and unscaled otherwise (PCGrad, CAGrad, IMTL, UPGrad, ... whose official code, like LibMTL and
torchjd's ``mtl_backward``, gives the heads their plain loss gradients); see each class's
``scale_task_params``. Parameters that no task claims (e.g. cross-stitch units) or that several
tasks claim count as shared.

Example:
    >>> import torch
    >>> from mtlcv.balancing.jacobian import jacobian
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> J, = jacobian(torch.stack([x.sum(), (x * x).sum()]), [x])
    >>> J.tolist()
    [[1.0, 1.0], [2.0, 4.0]]
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from ..errors import ConfigError

MODES = ("param", "rep")


def check_mode(mode: str, where: str = "balancer.options.mode") -> str:
    if mode not in MODES:
        raise ConfigError(f"{where} is {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
    """``(shared, per_task)``: trainable parameters used by all tasks, and those of each task.

    ``per_task`` follows ``model.tasks``; a parameter claimed by no task or by several tasks is
    shared. A model without ``tasks``/``task_parameters`` has only shared parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    tasks = getattr(model, "tasks", None)
    if not tasks or not hasattr(model, "task_parameters"):
        return params, []
    claims: dict[int, int] = {}
    per_task_all = [list(model.task_parameters(t)) for t in tasks]
    for ps in per_task_all:
        for p in {id(p): p for p in ps}.values():
            claims[id(p)] = claims.get(id(p), 0) + 1
    own = [
        [p for p in {id(p): p for p in ps}.values() if p.requires_grad and claims[id(p)] == 1]
        for ps in per_task_all
    ]
    owned = {id(p) for ps in own for p in ps}
    shared = [p for p in params if id(p) not in owned]
    return shared, own


_warned = False


def jacobian(
    outputs: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    grad_outputs: torch.Tensor | None = None,
    *,
    batched: bool = True,
    retain_graph: bool = True,
    safe: bool = True,
    info: dict | None = None,
) -> list[torch.Tensor]:
    """Rows ``t`` of the Jacobian of ``outputs`` with respect to each of ``inputs``.

    ``grad_outputs`` holds T cotangents stacked on dim 0 (default: the one-hot rows of the
    identity, for a vector ``outputs`` of length T); the result has one ``[T, *input.shape]`` tensor
    per input (zeros where an input is unused). ``batched`` computes all T vector-Jacobian products
    in one vmapped backward pass and falls back to a loop when batching is unsupported. ``safe``
    keeps the graph through the batched attempt so that the fallback can run; callers that
    know batching works for their graph pass ``safe=False`` so that ``retain_graph=False`` frees
    the graph at once (a retained graph would live on until the trainer drops ``losses``, i.e.
    through the next forward pass). ``info["batched"]`` tells which way was taken and
    ``info["unused"]`` which inputs no output depends on (their rows are zeros).
    """
    global _warned
    if grad_outputs is None:
        T = outputs.shape[0]
        grad_outputs = torch.eye(T, dtype=outputs.dtype, device=outputs.device)
    T = grad_outputs.shape[0]
    inputs = list(inputs)
    if not inputs:
        return []

    def zeros(x: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(*lead, *x.shape, dtype=x.dtype, device=x.device)

    if batched and T > 1:
        try:
            # keep the graph on a failed attempt so that the loop below can still run
            gs = torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=retain_graph or safe,
                allow_unused=True, is_grads_batched=True,
            )
            if info is not None:
                info["batched"] = True
                info["unused"] = [g is None for g in gs]
            return [zeros(x, (T,)) if g is None else g for g, x in zip(gs, inputs)]
        except RuntimeError as exc:  # an operator without a batching rule
            if not _warned:
                warnings.warn(
                    f"batched Jacobian failed ({str(exc).splitlines()[0]}); using a loop of "
                    "per-task backward passes", RuntimeWarning, stacklevel=2,
                )
                _warned = True
    rows = []
    for t in range(T):
        rows.append(torch.autograd.grad(
            outputs, inputs, grad_outputs[t], retain_graph=retain_graph or t < T - 1,
            allow_unused=True,
        ))
    unused = [all(r[i] is None for r in rows) for i in range(len(inputs))]
    if info is not None:
        info["batched"] = False
        info["unused"] = unused
    return [
        torch.stack([zeros(x, ()) if r[i] is None else r[i] for r in rows])
        for i, x in enumerate(inputs)
    ]


def _walk(root: object, stop: object) -> tuple[set[int], set[int], set[int]]:
    """Walk the graph from ``root`` without passing ``stop``.

    Returns the ids of the leaf tensors reached, of the nodes visited, and of the visited nodes
    that hold saved tensors (freed by a backward pass without ``retain_graph``).
    """
    leaves: set[int] = set()
    seen: set[int] = set()
    holding: set[int] = set()
    stack = [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn is stop or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            leaves.add(id(var))
        elif any(a.startswith("_raw_saved") for a in dir(fn)):
            holding.add(id(fn))
        stack.extend(nf for nf, _ in fn.next_functions)
    return leaves, seen, holding


def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.detach().reshape(p.shape).to(p.dtype)
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


@dataclass
class TaskGradients:
    """The per-task gradients of one step, and how to write an update back into ``.grad``.

    Attributes:
        matrix: ``G``, shape ``[T, P]``; row ``t`` is task ``t``'s gradient, flattened. None when
            only the Gramian was asked for and ``G`` was never formed (see ``gramian``).
        mode: ``"param"`` (columns = shared parameters) or ``"rep"`` (columns = the representation).
        shared: the shared parameters that receive the update.
        rep: the representation tensor in ``"rep"`` mode (its shape un-flattens the columns), and
            in ``"param"`` mode without ``matrix``.
        own: ``(param, task, grad)``: a head parameter's gradient of its own task's loss.
        stacked: ``(param, grads[T, ...])``: task parameters whose per-task rows were computed
            together (models without a separable representation).
        skip: ids of the shared parameters no loss depends on (their ``.grad`` stays None).
        gramian: ``G G^T`` (``[T, T]``, float64) when ``matrix`` is None; then
            :meth:`apply_weights` writes ``w @ G`` without ``G``.
        rows: ``[T, *rep.shape]``: ``c_t dL_t/dz`` (``"param"`` mode without ``matrix``).
        kept: ``(params, K)``: shared parameters whose rows ``K`` (``[T, n]``) were kept.
        rest: the other shared parameters: their part of ``w @ G`` is ``z``'s VJP with ``w @ rows``.
        local: with several processes in ``"rep"`` mode, after :meth:`globalise`: this process's
            columns ``(start, stop)`` of the global ``matrix``.
        rep_global: with several processes in ``"rep"`` mode, after :meth:`globalise`: the
            representations of the whole global batch (detached), in ``matrix``'s column order.
    """

    matrix: torch.Tensor | None
    mode: str
    shared: list[nn.Parameter]
    rep: torch.Tensor | None = None
    own: list[tuple[nn.Parameter, int, torch.Tensor]] = field(default_factory=list)
    stacked: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    skip: set[int] = field(default_factory=set)
    gramian: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    kept: tuple[list[nn.Parameter], torch.Tensor] | None = None
    rest: list[nn.Parameter] = field(default_factory=list)
    local: tuple[int, int] | None = None
    rep_global: torch.Tensor | None = None

    def globalise(self) -> None:
        """With several processes (engine/distributed.py): make ``matrix`` the per-task gradients
        of the *global* batch, identical on every process.

        ``"param"`` mode: the all-reduced mean of the processes' matrices (T x P numbers per
        step). ``"rep"`` mode: the columns are each process's own samples, so the global matrix
        is the concatenation of every process's block divided by the number of processes
        (all-gathered: T x global batch x representation size numbers); :meth:`apply` then takes
        this process's columns of the update. No-op for a single process.
        """
        from ..engine import distributed

        if not distributed.active():
            return
        if self.matrix is None:
            raise RuntimeError("globalise() needs the gradient matrix; pass gramian=False")
        if self.mode == "param":
            distributed.all_reduce(self.matrix, "mean")
            return
        assert self.rep is not None
        T, batch = self.matrix.shape[0], self.rep.shape[0]
        blocks = (self.matrix / distributed.world_size()).reshape(T, batch, -1)
        glob, (a, b) = distributed.all_gather_cat(blocks, dim=1)
        width = blocks.shape[2]
        self.matrix = glob.reshape(T, -1)
        self.local = (a * width, b * width)
        self.rep_global, _ = distributed.all_gather_cat(self.rep.detach(), dim=0)

    def synchronise(self, model: nn.Module) -> None:
        """After :meth:`apply`, with several processes: average the gradients that are still
        this process's own (heads; everything in ``"rep"`` mode) so every process holds the
        global gradient. ``"param"`` mode's shared update came from the global ``matrix``
        already; ``"rep"`` mode's shared gradients are summed (each process backpropagated its
        own columns of the global update)."""
        from ..engine import distributed

        if not distributed.active():
            return
        shared = {id(p) for p in self.shared}
        distributed.sync_gradients([p for p in model.parameters() if id(p) not in shared], "mean")
        if self.mode == "rep":
            distributed.sync_gradients(self.shared, "sum")

    def apply(self, update: torch.Tensor, task_coeffs: torch.Tensor) -> None:
        """Accumulate ``update`` (shape ``[P]``) into the shared ``.grad`` and the heads' gradients
        scaled by ``task_coeffs`` (shape ``[T]``) into the task parameters' ``.grad``."""
        update = update.detach()
        if self.mode == "rep":
            assert self.rep is not None
            if self.local is not None:
                update = update[self.local[0] : self.local[1]]
            if self.shared:
                torch.autograd.backward(
                    self.rep, update.reshape(self.rep.shape).to(self.rep.dtype),
                    inputs=self.shared,
                )
        else:
            _write(self.shared, update, self.skip)
        self._apply_heads(task_coeffs)

    def apply_weights(self, weights: torch.Tensor, task_coeffs: torch.Tensor) -> None:
        """Like ``apply(weights @ G, task_coeffs)``, for a step that formed only the Gramian."""
        assert self.rep is not None and self.rows is not None
        w = weights.detach().to(self.rows.dtype)
        if self.rest:  # one more backward pass, through the part of the encoder whose rows went
            d = torch.tensordot(w, self.rows, dims=1)
            torch.autograd.backward(self.rep, d, inputs=self.rest)
        if self.kept is not None:
            params, K = self.kept
            _write(params, w @ K, set())
        self._apply_heads(task_coeffs)

    def _apply_heads(self, task_coeffs: torch.Tensor) -> None:
        c = task_coeffs.detach()
        for p, t, g in self.own:
            _add_grad(p, c[t].to(g.dtype) * g)
        for p, g in self.stacked:
            _add_grad(p, torch.tensordot(c.to(g.dtype), g, dims=1))


def _write(params: Sequence[torch.Tensor], flat: torch.Tensor, skip: set[int]) -> None:
    i = 0
    for p in params:
        n = p.numel()
        if id(p) not in skip:
            _add_grad(p, flat[i : i + n])
        i += n


def per_task_edges(losses: torch.Tensor) -> list[GradientEdge | None] | None:
    """The graph edges of the individual task losses, when ``losses`` is ``torch.stack(list)``.

    Starting a backward pass at ``losses[t]`` would run *every* head (``StackBackward`` hands
    zero gradients to all the other tasks' losses); starting at task t's own loss runs head t
    alone. Returns None when ``losses`` was built some other way (no split is possible then).
    """
    fn = losses.grad_fn
    T = losses.shape[0]
    if (
        losses.dim() != 1
        or fn is None
        or fn.name() != "StackBackward0"
        or getattr(fn, "_saved_dim", None) != 0
        or len(fn.next_functions) != T
    ):
        return None
    return [None if node is None else GradientEdge(node, nr) for node, nr in fn.next_functions]


def _separation(
    losses: torch.Tensor, model: nn.Module, shared: list[nn.Parameter],
    own: list[list[nn.Parameter]],
) -> tuple[torch.Tensor | None, list[GradientEdge | None] | None, bool, bool]:
    """``(rep, edges, separable, free_heads)`` for the two-stage path (see ``task_gradients``)."""
    rep = None
    if getattr(model, "has_representation", False):
        rep = getattr(model, "representation", None)
        if not (isinstance(rep, torch.Tensor) and rep.requires_grad):
            rep = None
    edges = per_task_edges(losses) if rep is not None else None
    # the two-stage path needs every shared parameter (and every other task's head) to reach
    # each task's loss only through the representation
    separable = edges is not None
    # heads whose graphs share no node holding tensors can each free their graph when done
    free_heads = separable
    if separable:
        assert rep is not None and edges is not None
        shared_ids = {id(p) for p in shared}
        visited: set[int] = set()
        for t, edge in enumerate(edges):
            if edge is None:
                continue
            others = {id(p) for s, ps in enumerate(own) if s != t for p in ps}
            leaves, nodes, holding = _walk(edge.node, rep.grad_fn)
            if leaves & (shared_ids | others):
                separable = False
                break
            if holding & visited:
                free_heads = False
            visited |= nodes
    return rep, edges, separable, free_heads


_warned_models: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned_models:
        _warned_models.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def is_separable(losses: torch.Tensor, model: nn.Module) -> bool:
    """True when ``task_gradients`` can take ``model``'s two-stage path (``"rep"`` mode exists)."""
    shared, own = split_parameters(model)
    if own and len(own) != losses.shape[0]:
        return False
    return _separation(losses, model, shared, own or [[] for _ in range(losses.shape[0])])[2]


def task_gradients(
    losses: torch.Tensor,
    model: nn.Module,
    mode: str = "param",
    *,
    scale: torch.Tensor | None = None,
    batched: bool = True,
    safe: bool = True,
    info: dict | None = None,
    gramian: bool = False,
    on_row: Callable[[int, Sequence[torch.Tensor | None]], None] | None = None,
) -> TaskGradients:
    """Compute ``G`` for the loss vector ``losses`` (shape ``[T]``) of ``model``'s last forward.

    ``losses`` is the trainer's ``torch.stack`` of the task losses; ``scale`` (``[T]``, optional)
    multiplies task t's gradients (shared rows and head gradients) by ``scale[t]``: the
    derivative of a per-task loss transform such as DB-MTL's ``log L_t``. ``mode="rep"`` needs
    ``model.has_representation``, ``model.representation`` and heads that reach the shared
    parameters only through it; other models fall back to ``"param"`` (the exact space). See the
    module docstring for what is computed how, and :func:`jacobian` for ``batched``, ``safe``
    and ``info``.

    Two ways to skip ``G`` (``matrix`` is then None) on the two-stage path in ``"param"`` mode:
    ``gramian=True`` forms only ``G G^T`` (``TaskGradients.gramian``; the update is written by
    ``apply_weights``), and ``on_row(t, grads)`` receives each task's gradients of the shared
    parameters (in ``shared`` order, None where unused) as they are computed (DB-MTL folds
    them into its moving average). Elsewhere ``G`` is formed as usual.
    """
    check_mode(mode)
    T = losses.shape[0]
    c = torch.ones(T, dtype=losses.dtype, device=losses.device) if scale is None else scale
    c = c.detach().to(losses.dtype)
    shared, own = split_parameters(model)
    if own and len(own) != T:
        raise ValueError(f"model has {len(own)} tasks but {T} losses were given")
    own = own or [[] for _ in range(T)]
    rep, edges, separable, free_heads = _separation(losses, model, shared, own)
    jinfo: dict = {}
    kw = dict(batched=batched, safe=safe, info=jinfo)
    if not separable:
        if mode == "rep":
            _warn_once(
                f"{type(model).__name__} has no separable shared representation: per-task "
                "gradients are taken in parameter space (mode 'param')"
            )
        # no head/encoder split: the exact parameter space, from one batched VJP of the losses
        task_params = [p for ps in own for p in ps]
        inputs = [*shared, *task_params]
        J = jacobian(losses, inputs, torch.diag(c), retain_graph=False, **kw)
        _report(info, jinfo)
        Js, Jh = J[: len(shared)], J[len(shared) :]
        G = torch.cat([j.reshape(T, -1) for j in Js], 1) if Js else losses.new_zeros(T, 0)
        # parameters no loss depends on keep .grad = None, as after a plain backward
        skip = {id(p) for p, u in zip(inputs, jinfo.get("unused", [])) if u}
        stacked = [(p, j) for p, j in zip(task_params, Jh) if id(p) not in skip]
        return TaskGradients(G.detach(), "param", shared, stacked=stacked, skip=skip)
    # stage 1: the heads, once each: c_t dL_t/dz and the head's own gradient
    rows, own_grads = [], []
    for t, edge in enumerate(edges):
        gs: Sequence[torch.Tensor | None] = [None] * (1 + len(own[t]))
        if edge is not None:
            gs = torch.autograd.grad(
                [edge], [rep, *own[t]], [c[t].reshape(losses.shape[1:])],
                retain_graph=not free_heads, allow_unused=True,
            )
        rows.append(torch.zeros_like(rep) if gs[0] is None else gs[0])
        own_grads += [(p, t, g) for p, g in zip(own[t], gs[1:]) if g is not None]
    R = torch.stack(rows)
    if mode == "rep":
        return TaskGradients(R.reshape(T, -1), "rep", shared, rep, own=own_grads)
    # stage 2: the encoder, one backward pass per task, into G or into the Gramian only
    if gramian and rep.grad_fn is not None:
        M, kept, rest, skip = _encoder_gramian(rep, R, shared)
        return TaskGradients(None, "param", shared, rep, own=own_grads, skip=skip, gramian=M,
                             rows=R, kept=kept, rest=rest)
    G = R.new_empty(T, sum(p.numel() for p in shared)) if on_row is None else None
    used = [False] * len(shared)
    for t in range(T):
        gs = torch.autograd.grad(rep, shared, R[t], retain_graph=t < T - 1, allow_unused=True)
        if G is None:
            assert on_row is not None
            on_row(t, gs)
            used = [u or g is not None for u, g in zip(used, gs)]
        else:
            _write_row(G[t], shared, gs, used)
        del gs
    skip = {id(p) for p, u in zip(shared, used) if not u}
    return TaskGradients(G, "param", shared, own=own_grads, skip=skip)


def _write_row(row: torch.Tensor, params: Sequence[torch.Tensor],
               grads: Sequence[torch.Tensor | None], used: list[bool] | None = None) -> None:
    """Copy one task's gradients (None: zeros) into its row, parameter after parameter."""
    i = 0
    for k, (p, g) in enumerate(zip(params, grads)):
        n = p.numel()
        if g is None:
            row[i : i + n].zero_()
        else:
            row[i : i + n].copy_(g.reshape(-1))
            if used is not None:
                used[k] = True
        i += n


# ---------------------------------------------------------------------- Gramian without G
#: at most this many backward passes per task through one segment (parameter groups)
_MAX_GROUPS = 4


def encoder_segments(
    rep: torch.Tensor, shared: Sequence[torch.Tensor]
) -> list[tuple[list[torch.Tensor], list[GradientEdge]]]:
    """Cut the graph below ``rep`` at the nodes every path goes through (layer or residual-block
    boundaries): ``[(params, bottom_edges), ...]`` from ``rep`` down, where ``params`` are the
    shared parameters between the previous cut and this one and ``bottom_edges`` the edges into
    the cut (empty for the last segment). Shared parameters ``rep`` does not depend on are left out.

    Nodes are visited in a topological order that drains short branches (a weight's
    ``AccumulateGrad``, a transpose before it) first; a node is a cut when it is the only node
    the visited ones still point to. A parameter used on both sides of a node makes it no cut.
    """
    root = rep.grad_fn
    children: dict[int, list[tuple[object, int]]] = {}
    stack = [root]
    while stack:
        fn = stack.pop()
        if id(fn) in children:
            continue
        children[id(fn)] = ch = [(nf, nr) for nf, nr in fn.next_functions if nf is not None]
        stack.extend(nf for nf, _ in ch)
    indeg = dict.fromkeys(children, 0)
    for ch in children.values():
        for nf, _ in ch:
            indeg[id(nf)] += 1
    height: dict[int, int] = {}
    post = [(root, False)]
    while post:  # height = longest path to a leaf, iteratively
        fn, done = post.pop()
        k = id(fn)
        if done:
            height[k] = 1 + max((height[id(nf)] for nf, _ in children[k]), default=-1)
        elif k not in height:
            post.append((fn, True))
            post.extend((nf, False) for nf, _ in children[k] if id(nf) not in height)
    shared_ids = {id(p) for p in shared}
    seen = dict.fromkeys(children, 0)
    into: dict[int, set[int]] = {}  # output numbers of the edges into each pending node
    frontier = {id(root)}
    heap = [(height[id(root)], 0, root)]
    count = 1
    segments: list[tuple[list[torch.Tensor], list[GradientEdge]]] = []
    params: list[torch.Tensor] = []
    while heap:
        _, _, fn = heapq.heappop(heap)
        k = id(fn)
        var = getattr(fn, "variable", None)
        if var is None and fn is not root and len(frontier) == 1 and params:
            segments.append((params, [GradientEdge(fn, nr) for nr in sorted(into[k])]))
            params = []
        frontier.discard(k)
        if var is not None and id(var) in shared_ids:
            params.append(var)
        for nf, nr in children[k]:
            j = id(nf)
            seen[j] += 1
            frontier.add(j)
            into.setdefault(j, set()).add(nr)
            if seen[j] == indeg[j]:
                heapq.heappush(heap, (height[j], count, nf))
                count += 1
    if params or not segments:
        segments.append((params, []))
    return segments


def _groups(params: list[torch.Tensor], T: int, cap: int) -> list[list[torch.Tensor]]:
    """Split a segment's parameters (in graph order, from the top) into groups, each closed once
    its rows for all T tasks reach ``cap`` elements, and at most ``_MAX_GROUPS`` groups. Closing
    a group right after a large parameter (a convolution's weight) means the next group's pass
    does not compute that layer's input gradient again."""
    total = sum(p.numel() for p in params)
    cap = max(cap, -(-T * total // _MAX_GROUPS))
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        groups[-1].append(p)
        size += T * p.numel()
        if size >= cap:
            groups.append([])
            size = 0
    return [g for g in groups if g] or [[]]


def _gram(B: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """``B B^T`` in float64, summed over column chunks: a [T, n] x [n, T] product with a huge n
    is several times slower in one matrix multiplication than in cache-sized pieces."""
    M = torch.zeros(B.shape[0], B.shape[0], dtype=torch.float64, device=B.device)
    for b in B.split(chunk, dim=1):
        M += (b @ b.T).double()
    return M


def _encoder_gramian(
    rep: torch.Tensor, R: torch.Tensor, shared: list[nn.Parameter]
) -> tuple[torch.Tensor, tuple[list[nn.Parameter], torch.Tensor] | None, list[nn.Parameter],
           set[int]]:
    """``G G^T`` of the encoder part of ``G`` (rows: the VJPs of ``R[t]``), without forming ``G``.

    The encoder is walked down segment by segment (:func:`encoder_segments`), one backward pass
    per task and segment starting at the previous cut, so that only one parameter group's rows
    (``T x group``) exist at a time; they are added to the Gramian and dropped. The bottom
    segments, once their parameters need no more than one gradient's worth of memory for all T
    tasks, are done in one pass per task to the bottom and their rows are kept: ``w @ K`` is
    their update. The update of the dropped rows is the VJP of ``w @ R`` from ``rep``
    (:meth:`TaskGradients.apply_weights`), one extra backward pass through that part only.

    Returns ``(M, kept, rest, skip)``: the Gramian (float64), ``(params, K)``, the parameters
    left to the extra pass, and the ids of the shared parameters ``rep`` does not depend on.
    """
    T = R.shape[0]
    budget = sum(p.numel() for p in shared)  # one gradient's worth of elements
    segments = encoder_segments(rep, shared)
    reached = {id(p) for ps, _ in segments for p in ps}
    skip = {id(p) for p in shared if id(p) not in reached}
    # the highest cut above which the remaining rows fit in the budget
    below = [0] * (len(segments) + 1)
    for i in range(len(segments) - 1, -1, -1):
        below[i] = below[i + 1] + sum(p.numel() for p in segments[i][0])
    switch = next(i for i in range(len(segments) + 1) if T * below[i] <= budget)
    M = torch.zeros(T, T, dtype=torch.float64, device=R.device)
    tops: list[torch.Tensor | GradientEdge] = [rep]
    cots: list[list[torch.Tensor]] = [[R[t]] for t in range(T)]
    rest: list[nn.Parameter] = []
    # one buffer for every group's rows and then the kept rows: fresh memory would be paged in
    # again for each of them
    groups = [_groups(params, T, budget // 2) for params, _ in segments[:switch]]
    width = max((sum(p.numel() for p in g) for gs in groups for g in gs), default=0)
    kept_params = [p for ps, _ in segments[switch:] for p in ps]
    n_kept = sum(p.numel() for p in kept_params)
    work = R.new_empty(T * max(width, n_kept))
    for (params, bottom), segment_groups in zip(segments[:switch], groups):
        rest += params
        nxt: list[list[torch.Tensor]] = [[] for _ in range(T)]
        for gi, group in enumerate(segment_groups):
            inputs = [*group, *(bottom if gi == len(segment_groups) - 1 else [])]
            B = work[: T * sum(p.numel() for p in group)].view(T, -1)
            for t in range(T):
                gs = torch.autograd.grad(tops, inputs, cots[t], retain_graph=True,
                                         allow_unused=True)
                _write_row(B[t], group, gs[: len(group)])
                if gi == len(segment_groups) - 1:
                    nxt[t] = list(gs[len(group):])
            M += _gram(B)
        tops, cots = list(bottom), nxt
    kept = None
    if kept_params:
        K = work[: T * n_kept].view(T, n_kept)
        for t in range(T):
            gs = torch.autograd.grad(tops, kept_params, cots[t], retain_graph=t < T - 1,
                                     allow_unused=True)
            cots[t] = []
            _write_row(K[t], kept_params, gs)
        M += _gram(K)
        kept = (kept_params, K)
    return M, kept, rest, skip


def _report(info: dict | None, jinfo: dict) -> None:
    if info is not None and "batched" in jinfo:
        info["batched"] = jinfo["batched"]
