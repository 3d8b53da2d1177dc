"""mtlcv: multi-task learning for dense computer vision."""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import mtlcv` must not import torch
    if name == "load":
        from .inference import load

        return load
    raise AttributeError(f"module 'mtlcv' has no attribute {name!r}")
