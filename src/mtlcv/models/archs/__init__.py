"""Multi-task architectures, registered in :data:`mtlcv.registry.ARCHS`."""

from . import cross_stitch, hps, mtan, mti_net, padnet, sps, stl  # noqa: F401  (register)
