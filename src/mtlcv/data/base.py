"""The dataset contract.

A dataset is a ``torch.utils.data.Dataset`` whose items are dicts: ``image`` float ``[3,H,W]``
with values in [0, 1] (models normalise internally), plus one entry per target it provides,
keyed by task name and shaped as in :mod:`mtlcv.tasks.base` without the batch dimension.

It declares:

* ``targets``: the task names it can provide;
* ``task_options``: per task, the options its task needs (e.g. ``{"semseg": {"num_classes": 13}}``);
* ``task_kinds``: per task name, the registered task kind that scores it when the name is not
  itself a registered task, e.g. ``{"left": "classification", "right": "classification"}`` for
  two digit-classification tasks; names absent from it are their own kind;
* ``class_names`` (optional): per task, the names of its classes in id order (e.g.
  ``{"semseg": ["bed", ...]}``); checkpoints record them so predictions can be labelled;
* a sample that lacks a target it declares carries that target filled with the task's ignore
  value (255 for labels, 0 for depth and normals), so the loss and the metrics mask it; it is
  never dropped and never scored.

A target that is not a fixed-size tensor (detection boxes, a variable number per image) is an
object that batches itself: its type has a ``collate(values)`` static method, which
:func:`collate` (the loaders' ``collate_fn``) calls for that entry, e.g.
:class:`mtlcv.tasks.detection.Boxes` pads the boxes of a batch into one tensor; it also moves
with the image under :mod:`mtlcv.data.transforms` through its ``hflip`` and ``crop_resize``.

Factories are registered in :data:`mtlcv.registry.DATASETS` and called as
``factory(split=..., root=..., augment=..., **options)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset, default_collate


class MTLDataset(Dataset):
    targets: tuple[str, ...] = ()
    task_options: dict[str, dict[str, Any]] = {}
    task_kinds: dict[str, str] = {}
    class_names: dict[str, list[str]] = {}

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts: an entry whose values batch themselves (a type with a ``collate``
    static method, e.g. detection boxes) by that method, every other entry by PyTorch's
    ``default_collate`` (tensors stacked)."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        own = getattr(type(values[0]), "collate", None)
        out[key] = own(values) if own is not None else default_collate(values)
    return out
