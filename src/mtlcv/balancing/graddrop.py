"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..registry import BALANCERS
from .base import GradientBalancer, _check_matrix
from .jacobian import TaskGradients


class GradDrop(GradientBalancer):
    """GradDrop: keep, per element, only the task gradients of one randomly chosen sign.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout", NeurIPS 2020, Algorithm 1, applied at the shared representation ``A``:

    * ``G_t = sign(A) * grad_A L_t``, summed over the batch dimension (the paper's
      batch-separated case); the sign purity ``P = 1/2 (1 + sum_t G_t / sum_t |G_t|)`` (eq. 1);
    * ``U ~ Uniform(0, 1)`` per element; mask ``M_t = [P > U][G_t > 0] + [P < U][G_t < 0]``;
    * new gradient ``sum_t (l_t + (1 - l_t) M_t) grad_A L_t`` with the leak ``l_t`` (default 0,
      the paper's main setting; ``l_t = 1`` keeps task t's gradient whole).

    With leak 0 all gradients kept at an element share one sign. ``mode="rep"`` is the paper's
    setting (exact); models without a representation fall back to the shared parameters,
    element by element, without the ``sign(A)`` factor (as is ``aggregate`` on a bare matrix).
    The mask uses the global torch generator. No task weights (``last_weights`` stays None);
    heads get their plain gradients. Stateless.
    """

    default_mode = "rep"

    def __init__(
        self,
        num_tasks: int,
        leak: float | Sequence[float] = 0.0,
        mode: str | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__(num_tasks, mode, batched)
        leaks = [leak] * num_tasks if isinstance(leak, (int, float)) else list(leak)
        if len(leaks) != num_tasks or any(not 0.0 <= float(v) <= 1.0 for v in leaks):
            raise ConfigError(
                f"balancer.options.leak is {leak!r}; expected a value in [0, 1] or one per task"
            )
        self.register_buffer("leak", torch.tensor([float(v) for v in leaks]), persistent=False)
        #: the keep-mask of the last call, [T, elements] (for inspection and tests)
        self.last_mask: torch.Tensor | None = None

    def aggregate(
        self,
        G: torch.Tensor,
        losses: torch.Tensor | None = None,
        signs: torch.Tensor | None = None,
        batch: int = 1,
    ) -> torch.Tensor:
        """``G`` ``[T, P]``; ``signs``: ``sign(A)`` flattened ``[P]``; ``batch``: leading batch size
        of the representation whose flattened gradients are the columns of ``G``."""
        G = _check_matrix(G, self.num_tasks)
        T, P = G.shape
        if P % batch:
            raise ValueError(f"{P} columns cannot be split into a batch of {batch}")
        Gb = G.reshape(T, batch, P // batch)
        S = Gb if signs is None else Gb * signs.reshape(1, batch, P // batch).to(G)
        S = S.sum(1)  # [T, Q]
        purity = 0.5 * (1 + S.sum(0) / (S.abs().sum(0) + 1e-7))
        U = torch.rand_like(purity)
        M = (purity > U)[None] & (S > 0) | (purity < U)[None] & (S < 0)
        self.last_mask = M
        leak = self.leak.to(G)[:, None, None]
        keep = leak + (1 - leak) * M[:, None, :].to(G)
        return (Gb * keep).sum(0).reshape(P)

    def aggregate_gradients(self, tg: TaskGradients, losses: torch.Tensor) -> torch.Tensor:
        if tg.mode == "rep" and tg.rep is not None:
            # several processes: the whole global batch's representation (tg.globalise)
            rep = tg.rep_global if tg.rep_global is not None else tg.rep.detach()
            return self.aggregate(tg.matrix, losses, torch.sign(rep).flatten(), rep.shape[0])
        return self.aggregate(tg.matrix, losses)


@BALANCERS.register("graddrop", help="GradDrop (Chen et al. 2020), gradient sign dropout")
def graddrop(
    num_tasks: int, leak: float | Sequence[float] = 0.0, mode: str = "rep", batched: bool = True
) -> GradDrop:
    return GradDrop(num_tasks, leak, mode, batched)
