"""How tasks help or hurt each other during training: gradient conflict and inter-task affinity.

Two measurements on one training batch, both taken over the **shared parameters** ``theta_s`` of
the model (those :func:`mtlcv.balancing.jacobian.split_parameters` calls shared: the parameters
the gradient balancers act on; task-specific heads are left out):

* **gradient conflict**: the pairwise cosine similarity of the per-task gradients
  ``g_i = dL_i/dtheta_s``, ``cos(g_i, g_j) = <g_i, g_j> / (|g_i| |g_j|)`` (Yu et al., "Gradient
  Surgery for Multi-Task Learning" (PCGrad), NeurIPS 2020, Def. 1: tasks conflict when the
  cosine is negative). :func:`cosine_matrix`.

* **inter-task affinity** (lookahead affinity), Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently
  Identifying Task Groupings for Multi-Task Learning" (TAG), NeurIPS 2021, Eq. 1-2: take one
  step on task i's loss alone, of the shared parameters only,

      theta_s|i = theta_s - eta * dL_i/dtheta_s          (Eq. 1; the heads theta_j stay put)

  and measure how task j's loss on the *same batch* changes,

      Z_{i->j} = 1 - L_j(X, theta_s|i, theta_j) / L_j(X, theta_s, theta_j)        (Eq. 2)

  ``Z_{i->j} > 0``: a step on task i lowers task j's loss (i helps j); ``< 0``: it raises it.
  The paper averages Z over the steps of training to group tasks. :func:`lookahead_affinity`.

  Where the official code departs from the paper (google-research/tag: the CelebA notebook's
  ``train_step`` and the Taskonomy patch's ``lookahead``), and what we follow:

  - the code steps with the *training optimizer's* update (momentum SGD: the momentum buffer
    plus ``lr * grad``; the Taskonomy patch also adds weight decay) instead of Eq. 1's plain
    gradient step. The momentum part is the same for every task i, so it blurs what is specific
    to task i, and our trainers mostly use Adam. We follow the paper: a plain gradient step
    with ``eta`` = the optimizer's current learning rate.
  - the code divides Z by the learning rate (``(1 - L'/L) / lr``), which only rescales (to first
    order ``Z / eta ~ <g_i, g_j> / L_j``, independent of the learning rate and so comparable
    across a schedule). We record Z exactly as Eq. 2 defines it together with ``eta``; the
    report plots ``Z / eta``, the code's scale, and says so.
  - both run the lookahead forward pass in training mode (batch statistics in batch norm), as
    we do; the Taskonomy patch lets that extra pass update batch norm's running statistics, we
    restore them (the measurement must not change training).
  - the code takes the lookahead every 10th step; here the schedule is the trainer's
    ``train.log_gradients_every``.

To first order in ``eta``, ``L_j(theta_s - eta g_i) = L_j - eta <g_i, g_j>``, so
``Z_{i->j} = eta <g_i, g_j> / L_j + O(eta^2)``: the affinity has the sign of the gradient
cosine for small steps, and differs from it by weighing the dot product by the loss it changes
and by the curvature the finite step sees. Tests check this limit.

Example:
    >>> import torch
    >>> G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    >>> [round(v, 3) for v in cosine_matrix(G)[0].tolist()]
    [1.0, 0.707, -1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "cosine_matrix",
    "lookahead_affinity",
    "per_task_gradients",
    "shared_named_parameters",
]


def shared_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every shared trainable parameter of ``model``, in order.

    "Shared" as the balancers see it (:func:`mtlcv.balancing.jacobian.split_parameters`): used
    by all tasks, or claimed by no single task (cross-stitch units). Empty for single-task
    baselines and for soft sharing, whose task networks share no parameter.
    """
    from ..balancing.jacobian import split_parameters

    shared, _ = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for p in shared]


def per_task_gradients(losses: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``G`` ``[T, P]``: row ``t`` is ``dL_t/dparams``, flattened (zeros where unused).

    One vector-Jacobian product per task (batched when PyTorch can), freeing the graph.
    """
    from ..balancing.jacobian import jacobian

    if losses.dim() != 1:
        raise ValueError(f"expected a loss vector [T], got shape {list(losses.shape)}")
    params = list(params)
    if not params:
        return losses.new_zeros(losses.shape[0], 0)
    rows = jacobian(losses, params, retain_graph=False, safe=True)
    return torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)


def cosine_matrix(G: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``G`` (float64 ``[T, T]``).

    A zero row (a task whose loss does not reach the shared parameters on this batch) has no
    direction: its row and column are NaN, never a made-up 0.
    """
    G = G.detach().double()
    norms = G.norm(dim=1)
    cos = (G @ G.T) / (norms[:, None] * norms[None, :])
    bad = norms == 0
    cos[bad, :] = float("nan")
    cos[:, bad] = float("nan")
    return cos.clamp(-1.0, 1.0)


@torch.no_grad()
def lookahead_affinity(
    loss_at: Callable[[list[torch.Tensor]], torch.Tensor],
    params: Sequence[torch.Tensor],
    G: torch.Tensor,
    losses: torch.Tensor,
    lr: float,
) -> torch.Tensor:
    """TAG's lookahead affinity ``Z`` (float64 ``[T, T]``), ``Z[i, j] = Z_{i->j}`` (Eq. 2).

    Args:
        loss_at: the per-task losses ``[T]`` of the batch with the shared parameters replaced by
            the given tensors (same order and shapes as ``params``), every other parameter
            unchanged.
        params: the shared parameters ``theta_s``.
        G: their per-task gradients ``[T, P]`` (:func:`per_task_gradients`).
        losses: the losses at ``theta_s`` ``[T]`` (the denominators of Eq. 2).
        lr: the step size ``eta`` of Eq. 1.

    Entries whose denominator ``L_j`` is 0 (nothing to improve) are NaN.
    """
    params = list(params)
    T = G.shape[0]
    if G.shape[1] != sum(p.numel() for p in params):
        raise ValueError(f"G has {G.shape[1]} columns for {sum(p.numel() for p in params)} "
                         "parameter entries")
    base = losses.detach().double()
    Z = torch.empty(T, T, dtype=torch.float64)
    for i in range(T):
        stepped, k = [], 0
        for p in params:
            g = G[i, k : k + p.numel()].view_as(p).to(p.dtype)
            stepped.append(p.detach() - lr * g)
            k += p.numel()
        after = loss_at(stepped).detach().double().cpu()
        Z[i] = 1.0 - after / base.cpu()
    Z[:, base.cpu() == 0] = float("nan")
    return Z
