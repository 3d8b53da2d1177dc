"""Office-31 (Saenko et al., "Adapting Visual Category Models to New Domains", ECCV 2010) and
Office-Home (Venkateswara et al., "Deep Hashing Network for Unsupervised Domain Adaptation",
CVPR 2017) as multi-task classification, as in LibMTL (Lin & Zhang, JMLR 2023): one task per
domain, every domain with the same classes.

Layouts (the datasets' own image folders):

* ``office-31``: ``ROOT/{amazon,dslr,webcam}/images/<class>/*.jpg``, 31 classes;
* ``office-home``: ``ROOT/{Art,Clipart,Product,Real_World}/<class>/*.jpg``, 65 classes.

Class ids are the sorted class-folder names (as LibMTL's lists). Splits: LibMTL ships its random
60/20/20 split as ``data_txt/<dataset>/<domain>_{train,val,test}.txt`` (lines
``<path relative to ROOT> <class id>``); give that folder as ``splits`` to use it exactly.
Without it, each domain's images of each class are split 60/20/20 at random with ``split_seed``.

Tasks are named after the domains (``tasks: [amazon, dslr, webcam]``) and are all of kind
``classification`` (``task_kinds``). LibMTL trains them as a *multi-input* problem: every step
draws one batch per domain. The batch contract has one image batch, so here each sample is one
image that carries its own domain's label and 255 (ignore) for every other domain: each task's
loss is its cross-entropy over the batch's images of its domain. ``balance: true`` (default, on
the training split) repeats the smaller domains' images up to the largest domain's count, so
every domain contributes the same number of images per epoch, as LibMTL's cycling of the
smaller domains' loaders does. Images are resized to ``size`` (default 224×224, LibMTL's);
``data.augment`` flips them horizontally at random (LibMTL trains without augmentation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from .base import MTLDataset
from .dense import check_size, read_image
from .nyuv2.common import check_split

DOMAINS = {
    "office-31": ("amazon", "dslr", "webcam"),
    "office-home": ("Art", "Clipart", "Product", "Real_World"),
}
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def domain_folder(root: Path, dataset: str, domain: str) -> Path:
    """Where a domain's class folders are (Office-31 nests them under ``images/``)."""
    d = root / domain
    return d / "images" if dataset == "office-31" and (d / "images").is_dir() else d


class OfficeDataset(MTLDataset):
    """One image per item, labelled for its own domain's task (see the module docstring)."""

    def __init__(self, dataset: str, root: str | Path, split: str = "train",
                 domains: Sequence[str] | None = None, splits: str | None = None,
                 split_seed: int = 0, balance: bool = True,
                 size: Sequence[int] | None = (224, 224), augment: bool = False) -> None:
        where = f"dataset {dataset!r}"
        check_split(split, where)
        all_domains = DOMAINS[dataset]
        domains = list(all_domains if domains is None else domains)
        bad = [d for d in domains if d not in all_domains]
        if bad or not domains:
            raise ConfigError(f"{where}: unknown domain {bad[0] if bad else domains!r}; valid: "
                              f"{', '.join(all_domains)}")
        self.size = check_size(size, where)
        self.root = root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: dataset folder not found")
        first = domain_folder(root, dataset, domains[0])
        if not first.is_dir():
            raise DataError(f"{first}: domain folder not found (expected ROOT/<domain>/"
                            f"{'images/' if dataset == 'office-31' else ''}<class>/*.jpg)")
        self.classes = sorted(p.name for p in first.iterdir() if p.is_dir())
        if not self.classes:
            raise DataError(f"{first}: no class folders")
        self.targets = tuple(domains)
        self.task_kinds = {d: "classification" for d in domains}
        self.task_options = {d: {"num_classes": len(self.classes)} for d in domains}
        per_domain: list[list[tuple[Path, int]]] = []
        for d in domains:
            items = (self._from_list(Path(splits).expanduser(), d, split) if splits
                     else self._random_split(dataset, d, split, split_seed))
            if not items:
                raise DataError(f"{domain_folder(root, dataset, d)}: no images for split {split!r}")
            per_domain.append(items)
        if balance and split == "train":
            n = max(len(x) for x in per_domain)
            per_domain = [(x * math.ceil(n / len(x)))[:n] for x in per_domain]
        self.items = [(p, t, c) for t, x in enumerate(per_domain) for p, c in x]
        self.augment = bool(augment)

    def _random_split(self, dataset: str, domain: str, split: str,
                      seed: int) -> list[tuple[Path, int]]:
        folder = domain_folder(self.root, dataset, domain)
        if not folder.is_dir():
            raise DataError(f"{folder}: domain folder not found")
        have = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if have != self.classes:
            extra = sorted(set(have) ^ set(self.classes))
            raise DataError(f"{folder}: class folders differ from the first domain's ({extra[0]})")
        out = []
        for c, name in enumerate(self.classes):
            files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in EXTENSIONS)
            order = np.random.default_rng([seed, c]).permutation(len(files))
            a, b = round(0.6 * len(files)), round(0.8 * len(files))
            part = {"train": order[:a], "val": order[a:b], "test": order[b:]}[split]
            out += [(files[k], c) for k in sorted(part)]
        return out

    def _from_list(self, folder: Path, domain: str, split: str) -> list[tuple[Path, int]]:
        path = folder / f"{domain}_{split}.txt"
        if not path.is_file():
            raise DataError(f"{path}: split list not found (expected <domain>_<split>.txt, "
                            "LibMTL's data_txt layout)")
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                rel, c = parts[0], int(parts[1])
            except (IndexError, ValueError):
                raise DataError(f"{path} line {n}: expected '<image path> <class id>'") from None
            if not 0 <= c < len(self.classes):
                raise DataError(f"{path} line {n}: class id {c} outside [0, {len(self.classes)})")
            out.append((self.root / rel, c))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, t, c = self.items[i]
        img = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        if self.size is not None and tuple(img.shape[-2:]) != self.size:
            img = F.interpolate(img[None], size=self.size, mode="bilinear",
                                align_corners=False)[0]
        if self.augment and bool(torch.rand(()) < 0.5):  # a horizontal flip
            img = img.flip(-1)
        sample = {"image": img.contiguous()}
        for k, d in enumerate(self.targets):
            sample[d] = torch.tensor(c if k == t else 255, dtype=torch.long)
        return sample


def _factory(dataset: str):
    def make(split: str = "train", root: str | None = None, augment: bool = False,
             domains: Sequence[str] | None = None, splits: str | None = None,
             split_seed: int = 0, balance: bool = True,
             size: Sequence[int] | None = (224, 224)) -> OfficeDataset:
        if root is None:
            raise ConfigError(f"config key 'data.root': dataset {dataset!r} needs the folder "
                              f"holding {', '.join(DOMAINS[dataset])} (see docs/datasets.md)")
        return OfficeDataset(dataset, root, split, domains, splits, split_seed, balance, size,
                             augment)

    make.__doc__ = (f"{dataset}: one classification task per domain "
                    f"({', '.join(DOMAINS[dataset])}), LibMTL's benchmark")
    return make


office31 = DATASETS.register("office-31")(_factory("office-31"))
office_home = DATASETS.register("office-home")(_factory("office-home"))
