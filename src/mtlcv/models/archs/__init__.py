"""Multi-task architectures."""
from . import hps, stl  # noqa: F401
