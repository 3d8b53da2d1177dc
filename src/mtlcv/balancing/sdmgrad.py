"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji,
NeurIPS 2023)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import check_positive, clip_shared
from .double_sampling import DoubleSampling
from .solvers import project_simplex


class SDMGrad(DoubleSampling):
    """SDMGrad: MGDA's direction regularised towards the average gradient, with double sampling.

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023, Algorithm 1 (SDMGrad): the weights minimise
    ``1/2 ||G^T w + lamda g0||^2`` over the simplex (``g0`` the mean gradient), by ``niter``
    projected SGD steps (learning rate ``inner_lr``, momentum 0.5, as the official code) on the
    double-sampled gradient ``G1 G2^T w + lamda G1 G2^T 1/T``, the Gramian first divided by the
    square of the mean ``sqrt(diag + 1e-4)`` (official); then ``d = (G3^T w + lamda g0) / (1 +
    lamda)`` with ``g0`` the mean of ``G3``. ``lamda = 0`` is (stochastic) MGDA, a large ``lamda``
    the average gradient. ``w`` starts at ``1/T`` and is warm-started from the last step
    (official); its momentum restarts every step (a new SGD optimiser per step in the official
    code). Negative diagonal entries of a cross-sample Gramian are clamped to 0 before the square
    root (LibMTL).

    Defaults: ``lamda = 0.3``, ``niter = 20``, ``inner_lr = 10`` (the official command-line
    defaults, used for NYUv2 and Cityscapes; LibMTL uses the same with inner learning rate 5).
    With the Gramian normalised to unit mean diagonal, a step of 10 is larger than ``2 / L``, so
    the official inner loop oscillates between vertices of the simplex rather than converging to
    the minimiser (the tests show it); a small ``inner_lr`` with more ``niter`` solves the
    paper's problem. ``max_norm = 1.0``:
    the official code clips the shared gradient to norm 1 (and multiplies the update by T before
    clipping, which we do not). Samples: see :class:`DoubleSampling` (the official code draws
    two extra batches per step). Heads get their plain gradients. ``last_weights`` are the
    coefficients of ``d`` on ``G``. State: ``w`` and the previous ``G``.
    """

    def __init__(
        self, num_tasks: int, lamda: float = 0.3, niter: int = 20, inner_lr: float = 10.0,
        max_norm: float = 1.0, samples: str = "previous", mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, samples, mode, batched)
        self.inner_lr = check_positive(inner_lr, "inner_lr")
        self.lamda = check_positive(lamda, "lamda", allow_zero=True)
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
            raise ConfigError(f"balancer.options.niter must be an integer >= 1, got {niter!r}")
        self.niter = niter
        self.max_norm = check_positive(max_norm, "max_norm", allow_zero=True)
        self.register_buffer("w", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))

    def inner_weights(self, C: np.ndarray, niter: int | None = None) -> np.ndarray:
        """``niter`` projected SGD steps (``inner_lr``, momentum 0.5) from the stored ``w``."""
        T = C.shape[0]
        d = np.clip(np.diag(C), 0.0, None)
        scale = float(np.mean(np.sqrt(d + 1e-4)))
        C = C / (scale**2 + 1e-8)
        Cg = C.mean(1)
        w = self.w.cpu().numpy().copy()
        buf = np.zeros(T)
        for k in range(self.niter if niter is None else niter):
            g = C @ w + self.lamda * Cg
            buf = g if k == 0 else 0.5 * buf + g  # torch.optim.SGD's momentum (dampening 0)
            w = project_simplex(w - self.inner_lr * buf)
        return w

    def aggregate_samples(self, G1: torch.Tensor, G2: torch.Tensor,
                          G3: torch.Tensor) -> torch.Tensor:
        T = self.num_tasks
        C = (G1.double() @ G2.double().T).cpu().numpy()
        w = self.inner_weights(C)
        self.w.copy_(torch.from_numpy(w))
        coef = (self.w + self.lamda / T) / (1.0 + self.lamda)
        self.last_weights = coef.to(G3)
        return self.last_weights @ G3

    def after_backward(self, model: nn.Module) -> None:
        clip_shared(model, self.max_norm)


@BALANCERS.register("sdmgrad", help="SDMGrad (Xiao et al. 2023), lamda = 0.3")
def sdmgrad(
    num_tasks: int, lamda: float = 0.3, niter: int = 20, inner_lr: float = 10.0,
    max_norm: float = 1.0, samples: str = "previous", mode: str = "param", batched: bool = True,
) -> SDMGrad:
    return SDMGrad(num_tasks, lamda, niter, inner_lr, max_norm, samples, mode, batched)
