"""mtlcv: multi-task learning for dense computer vision."""

__version__ = "0.1.0"
