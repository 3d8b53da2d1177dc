"""Loading published weights (e.g. torchvision ImageNet checkpoints) from a local file.

Nothing is ever downloaded: a user fetches a checkpoint elsewhere and points the config at it,
e.g. ``model.backbone: {name: resnet18, weights: ~/resnet18-f37072fd.pth}``. Files saved with
``torch.save(model.state_dict())`` are read as they are; training checkpoints that wrap the
state dict under ``"state_dict"`` or ``"model"`` and ``DataParallel``/DDP's ``module.`` prefix
are accepted too. Any mismatch is a :class:`~mtlcv.errors.ConfigError` naming the file and the
first offending keys, never a silent partial load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

#: how many offending keys a mismatch message names
_SHOWN = 3


def read_state_dict(path: str | Path, *, where: str = "weights") -> dict[str, torch.Tensor]:
    """Read the state dict in ``path``: raw or under "state_dict"/"model"; "module." stripped."""
    file = Path(path).expanduser()
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, a folder, not a torch file, truncated...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{where}: cannot read {str(file)!r} ({reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{where}: {str(file)!r} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def state_problems(
    own: Mapping[str, Any],
    state: Mapping[str, Any],
    source: str,
    optional: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Why ``state`` does not fit a module whose state dict is ``own``: missing keys (except
    ``optional`` ones), unexpected keys, shape mismatches (``source`` names the state's side,
    e.g. "file"), each a short phrase naming at most three keys; empty when it fits."""
    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} ({source} {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    return [
        f"{label} {', '.join(keys[:_SHOWN])}{' ...' if len(keys) > _SHOWN else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", wrong),
        )
        if keys
    ]


def load_weights(
    module: nn.Module,
    path: str | Path,
    *,
    ignore: Sequence[str] = (),
    where: str = "weights",
) -> None:
    """Load the state dict in ``path`` into ``module``; keys starting with ``ignore`` are skipped.

    Every key of ``module`` must be in the file with the same shape, and vice versa, except
    BatchNorm's ``num_batches_tracked`` counters, which checkpoints saved before PyTorch 0.4.1
    (among them torchvision's original ResNet weights) do not have.
    """
    state = {
        k: v
        for k, v in read_state_dict(path, where=where).items()
        if not k.startswith(tuple(ignore))
    }
    problems = state_problems(module.state_dict(), state, "file",
                              optional=lambda k: k.endswith("num_batches_tracked"))
    if problems:
        raise ConfigError(
            f"{where}: {str(Path(path).expanduser())!r} does not fit "
            f"{type(module).__name__}: {'; '.join(problems)}"
        )
    # strict=False only for the num_batches_tracked counters accepted above
    module.load_state_dict(state, strict=False)
