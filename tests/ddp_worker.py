"""Run under ``torchrun --nproc-per-node N``: train one small config per balancer given on the
command line into ``OUT/<balancer>``, then save each process's parameters and balancer state to
``OUT/<balancer>/rank<r>.pt`` (tests/test_distributed.py compares them).

Usage: torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py CONFIG.json OUT name...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mtlcv.config import from_dict
from mtlcv.engine import distributed
from mtlcv.engine.trainer import Trainer


def main() -> None:
    torch.set_num_threads(1)
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    for name in sys.argv[3:]:
        c = dict(cfg, balancer={"name": name})
        t = Trainer(from_dict(c), out / name, log=lambda s: None)
        t.fit()
        state = {
            "model": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
            "balancer": {k: v.detach().clone() for k, v in t.balancer.state_dict().items()
                         if isinstance(v, torch.Tensor)},
            "last_weights": getattr(t.balancer, "last_weights", None),
        }
        torch.save(state, out / name / f"rank{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main()
