"""Multi-task architectures, registered in :data:`mtlcv.registry.ARCHS`."""

from . import (  # noqa: F401  (register)
    cgc,
    cross_stitch,
    dselect_k,
    hps,
    ltb,
    mmoe,
    mtan,
    mti_net,
    nddr_cnn,
    padnet,
    ple,
    sps,
    stl,
)
