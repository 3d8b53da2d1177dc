"""CAGrad: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer, check_positive
from .solvers import as_numpy, minimize_simplex


class CAGrad(GradientBalancer):
    """CAGrad: the best worst-case improvement within a ball around the average gradient.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, sec. 3:
    the primal problem and its dual (Algorithm 1): with ``g0`` the average gradient and
    ``phi = c^2 ||g0||^2``,

    ``w* = argmin_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||``  (``g_w = sum_t w_t g_t``),
    ``d = g0 + sqrt(phi) / ||g_w*|| g_w*``,

    rescaled as in the official code: ``d / (1 + c^2)`` (``rescale=1``, its default and the NYUv2
    setting), ``d`` (``rescale=0``) or ``d / (1 + c)`` (``rescale=2``). ``c = 0.4`` is the paper's
    NYUv2 value (0.5 is the code's generic default); ``c = 0`` gives the average gradient. The
    inner problem is solved on the Gramian by accelerated projected gradient (solvers.py) with
    the official ``1e-8`` terms. ``last_weights`` are the coefficients of ``d`` on the task
    gradients. Heads get their plain gradients (official code). Stateless.

    ``sum_scale``: the official NYUv2 code multiplies the shared update by T "to match the sum
    loss" (Cranial-XIX/CAGrad ``nyuv2/utils.py``, ``overwrite_grad``, which its MGDA, PCGrad and
    GradDrop runs share; Nash-MTL's ``CAGrad.overwrite_grad`` does the same), while the paper's
    Algorithm 1 and LibMTL use ``d`` itself. ``sum_scale: true`` applies the factor T (the
    published configs set it). It matters under SGD; under Adam, whose steps are invariant to
    a constant per-parameter gradient scale, it only changes the weight of Adam's epsilon.
    """

    def __init__(
        self,
        num_tasks: int,
        c: float = 0.4,
        rescale: int = 1,
        sum_scale: bool = False,
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        self.c = check_positive(c, "c", allow_zero=True)
        if rescale not in (0, 1, 2):
            raise ConfigError(f"balancer.options.rescale is {rescale!r}; expected 0, 1 or 2")
        if not isinstance(sum_scale, bool):
            raise ConfigError(
                f"balancer.options.sum_scale is {sum_scale!r}; expected true or false"
            )
        self.rescale = rescale
        self.sum_scale = sum_scale
        #: the inner problem's solution w* of the last call
        self.last_inner: torch.Tensor | None = None

    def gramian_weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        T = M.shape[0]
        A = as_numpy(M)
        b = np.full(T, 1.0 / T)
        g0_norm = np.sqrt(max(A.mean(), 0.0) + 1e-8)
        c = self.c * g0_norm + 1e-8

        def f(w: np.ndarray) -> float:
            return float(w @ A @ b + c * np.sqrt(max(w @ A @ w, 0.0) + 1e-8))

        def grad(w: np.ndarray) -> np.ndarray:
            Aw = A @ w
            return A @ b + c * Aw / np.sqrt(max(w @ Aw, 0.0) + 1e-8)

        w = minimize_simplex(f, grad, b.copy())
        self.last_inner = torch.from_numpy(w)
        gw_norm = np.sqrt(max(w @ A @ w, 0.0))
        lam = c / (gw_norm + 1e-8)
        coef = b + lam * w
        div = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        if self.sum_scale:  # the official code's "* T to match the sum loss"
            div = div / T
        return torch.from_numpy(coef / div).to(M)


@BALANCERS.register("cagrad", help="CAGrad (Liu et al. 2021), c = 0.4")
def cagrad(
    num_tasks: int,
    c: float = 0.4,
    rescale: int = 1,
    sum_scale: bool = False,
    mode: str = "param",
    batched: bool = True,
) -> CAGrad:
    return CAGrad(num_tasks, c, rescale, sum_scale, mode, batched)
