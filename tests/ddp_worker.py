"""Run under ``torchrun``: train one small config per name on the command line into
``OUT/<name>``, then save each process's parameters and balancer state to
``OUT/<name>/rank<r>.pt`` (tests/test_distributed.py compares them with one process). A name
is a balancer, or a key of the config's ``"variants"``: changes to the config (see
:func:`variant`).

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


def variant(cfg: dict, name: str) -> dict:
    """The config of run ``name``: ``cfg["variants"][name]`` merged into ``cfg`` (one level of
    nesting: ``{"data": {"eval_batch_size": 2}}`` changes that key only), else ``cfg`` with the
    balancer ``name``."""
    base = {k: v for k, v in cfg.items() if k != "variants"}
    changes = cfg.get("variants", {}).get(name)
    if changes is None:
        return dict(base, balancer={"name": name})
    out = dict(base)
    for k, v in changes.items():
        out[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def main() -> None:
    from mtlcv.config import from_dict
    from mtlcv.engine import distributed
    from mtlcv.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    for name in sys.argv[3:]:
        t = Trainer(from_dict(variant(cfg, name)), out / name, log=lambda s: None)
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
