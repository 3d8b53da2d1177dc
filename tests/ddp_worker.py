"""Run under ``torchrun``: train one small config per balancer named on the command line into
``OUT/<balancer>``, then save each process's parameters and balancer state to
``OUT/<balancer>/rank<r>.pt`` (tests/test_distributed.py compares them with one process).

Usage: torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py CONFIG.json OUT NAME...

Also registers ``test-masked-scenes``: the scenes dataset with a different share of every image's
pixels unlabelled (semseg 255, depth and normals 0), so that the processes of a step hold
different numbers of valid pixels (the case where a mean of per-process means is wrong).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mtlcv.registry import DATASETS


class MaskedScenes(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base
        for k in ("targets", "task_options", "task_kinds"):
            setattr(self, k, getattr(base, k, {}))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        g = torch.Generator().manual_seed(1000 + i)
        drop = torch.rand(item["image"].shape[-2:], generator=g) < (i % 5) / 6  # 0 to 67 %
        item["semseg"] = torch.where(drop, torch.full_like(item["semseg"], 255), item["semseg"])
        item["depth"] = torch.where(drop, torch.zeros_like(item["depth"]), item["depth"])
        item["normals"] = torch.where(drop, torch.zeros_like(item["normals"]), item["normals"])
        return item


if "test-masked-scenes" not in DATASETS:

    @DATASETS.register("test-masked-scenes", help="scenes with a varying share of pixels masked")
    def _masked(split="train", root=None, augment=False, **options):
        return MaskedScenes(DATASETS.create("scenes", split=split, root=root, augment=augment,
                                            **options))


def main() -> None:
    from mtlcv.config import from_dict
    from mtlcv.engine import distributed
    from mtlcv.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    for name in sys.argv[3:]:
        t = Trainer(from_dict(dict(cfg, balancer={"name": name})), out / name, log=lambda s: None)
        t.fit()
        state = {
            "model": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
            "balancer": {k: v.detach().clone() for k, v in t.balancer.state_dict().items()
                         if isinstance(v, torch.Tensor)},
        }
        torch.save(state, out / name / f"rank{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main()
