"""IMTL: Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import BALANCERS
from .base import GradientBalancer, Weighting, weight_logs


def imtl_g_weights(M: torch.Tensor) -> torch.Tensor:
    """IMTL-G's closed form (Liu et al. 2021, sec. 3.2) on the Gramian ``M = G G^T``.

    ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum alpha_{2:T}`` with rows
    ``D_t = g_1 - g_t`` and ``U_t = u_1 - u_t`` (``u_t = g_t / ||g_t||``); every entry is an inner
    product, so only ``M`` is needed: ``g_a . u_b = M_ab / ||g_b||``.
    """
    T = M.shape[0]
    if T == 1:
        return torch.ones(1, dtype=M.dtype)
    n = M.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    N = M / n[None, :]  # N[a, b] = g_a . u_b
    X = N[0, 0] - N[0, 1:][None, :] - N[1:, 0][:, None] + N[1:, 1:]  # (D U^T)[a, b]
    y = N[0, 0] - N[0, 1:]  # g_1 U^T
    # alpha X = y; lstsq keeps it finite when two gradients are parallel (X singular)
    rest = torch.linalg.lstsq(X.T.cpu(), y.cpu()[:, None]).solution[:, 0]
    return torch.cat([(1 - rest.sum())[None], rest])


class IMTLG(GradientBalancer):
    """IMTL-G: the update whose projections on all unit task gradients are equal.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, sec. 3.2: find
    ``d = sum_t alpha_t g_t`` with ``sum_t alpha_t = 1`` and ``d . u_1 = d . u_t`` for all t
    (``u_t = g_t / ||g_t||``), in closed form. No hyper-parameters. Heads get their plain
    gradients (task-specific parameters follow their own loss, as in LibMTL). Stateless.
    """

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return imtl_g_weights(M.cpu()).to(M)


class IMTLL(Weighting):
    """IMTL-L: learned loss scales that make every scaled loss equal to 1.

    Liu et al., ICLR 2021, sec. 3.1: each loss becomes ``exp(s_t) L_t - s_t`` with a
    learnable ``s_t`` (init 0; no hyper-parameters); ``d/ds_t = exp(s_t) L_t - 1 = 0`` at the
    optimum, i.e. the scaled losses are balanced at 1. The ``s_t`` are ``nn.Parameter`` s trained
    by the trainer's optimizer with the model (in ``state_dict()``).
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.scale = nn.Parameter(torch.zeros(num_tasks))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.scale.to(losses.dtype))

    def scaled(self, losses: torch.Tensor) -> torch.Tensor:
        return self.weights(losses) * losses - self.scale.to(losses.dtype)

    def backward(self, losses: torch.Tensor, model: nn.Module | None = None) -> dict[str, float]:
        self.scaled(losses).sum().backward()
        self.sync_gradients(model)
        return weight_logs(self.weights(losses))


class IMTL(GradientBalancer):
    """IMTL (hybrid): IMTL-L's loss scaling, then IMTL-G on the gradients of the scaled losses.

    Liu et al., ICLR 2021, sec. 3.3 and Algorithm 1: the losses ``exp(s_t) L_t - s_t`` (IMTL-L)
    give the gradients ``exp(s_t) grad L_t`` that IMTL-G combines for the shared parameters; the
    scales ``s_t`` are learned from ``exp(s_t) L_t - s_t`` (their gradient is set here, and the
    trainer's optimizer steps them with the model). Heads get their own scaled-loss gradient
    ``exp(s_t) grad L_t``. State: ``s`` (in ``state_dict()``).
    """

    def __init__(self, num_tasks: int, mode: str | None = None, batched: bool = True) -> None:
        super().__init__(num_tasks, mode, batched)
        self.scale = nn.Parameter(torch.zeros(num_tasks))

    def loss_scale(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.scale.to(losses.dtype)
        # the scales' own gradient, exp(s) L - 1, without touching the network
        (g,) = torch.autograd.grad((torch.exp(s) * losses.detach() - s).sum(), self.scale)
        self.scale.grad = g if self.scale.grad is None else self.scale.grad + g
        return torch.exp(s.detach())  # grad (exp(s) L - s) = exp(s) grad L

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return imtl_g_weights(M.cpu()).to(M)


@BALANCERS.register("imtl-g", help="IMTL-G (Liu et al. 2021), equal projections on unit gradients")
def imtl_g(num_tasks: int, mode: str = "param", batched: bool = True) -> IMTLG:
    return IMTLG(num_tasks, mode, batched)


@BALANCERS.register("imtl-l", help="IMTL-L (Liu et al. 2021), learned loss scales")
def imtl_l(num_tasks: int) -> IMTLL:
    return IMTLL(num_tasks)


@BALANCERS.register("imtl", help="IMTL (Liu et al. 2021), hybrid of IMTL-L and IMTL-G")
def imtl(num_tasks: int, mode: str = "param", batched: bool = True) -> IMTL:
    return IMTL(num_tasks, mode, batched)
