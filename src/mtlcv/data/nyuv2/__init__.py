"""NYUv2 (Silberman et al., ECCV 2012) in every public on-disk layout, as datasets of the batch
contract (:mod:`mtlcv.data.base`); docs/datasets.md says how to obtain each one.

=================  ==========================================================================
``nyuv2``          (a) mtan's preprocessed ``.npy`` release, 288×384 (:mod:`.folder`)
``nyuv2-mat``      (b) the official ``nyu_depth_v2_labeled.mat`` + ``splits.mat`` (:mod:`.mat`)
``nyuv2-fixture``  (c) the 28-frame real fixture in ``shared/data/nyuv2-fixture`` (:mod:`.fixture`)
=================  ==========================================================================
"""

from __future__ import annotations

from .common import CLASSES13, NYUv2Dataset
from .fixture import NYUv2Fixture, nyuv2_fixture
from .folder import NYUv2Folder, nyuv2
from .geometry import NYU_INTRINSICS, Intrinsics, normals_from_depth
from .mat import NYUv2Mat, load_mapping, nyuv2_mat

__all__ = [
    "CLASSES13",
    "NYU_INTRINSICS",
    "Intrinsics",
    "NYUv2Dataset",
    "NYUv2Fixture",
    "NYUv2Folder",
    "NYUv2Mat",
    "load_mapping",
    "normals_from_depth",
    "nyuv2",
    "nyuv2_fixture",
    "nyuv2_mat",
]
