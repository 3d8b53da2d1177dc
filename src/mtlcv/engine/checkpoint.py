"""Atomic checkpoints, safe loading and RNG state capture.

Writing. A checkpoint is written to a temporary file in the same folder (``.NAME.*.tmp``),
flushed and fsynced, then moved into place with ``os.replace``, so a crash or SIGKILL mid-write
never leaves a truncated ``last.pt`` behind and never destroys the previous one. A write that
fails (disk full, read-only file system, permissions) removes its temporary file and raises a
:class:`~mtlcv.errors.CheckpointError` naming the file and the system's reason; the previous
checkpoint is untouched. Temporary files left by a process that was killed mid-write are
removed by :func:`remove_stale_temporaries` when the run is resumed.

Reading. Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and plain
Python containers and numbers are unpickled, so a checkpoint from someone else's run directory
cannot execute code. Everything the trainer saves is therefore plain: RNG states are stored as
tensors and lists (NumPy's state as a list and a tensor, never an ``ndarray``).
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

#: the names of atomic writes' temporary files
TMP_GLOB = ".*.tmp"


def _umask() -> int:
    """The process's current umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    """A short, user-facing reason for a failed file operation."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or type(exc).__name__


def _write_atomically(path: Path, write: Any, what: str) -> None:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync it, move it into place."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CheckpointError(
            f"cannot write {what} {str(path)!r}: {_reason(exc)}; the previous version (if any) "
            "is kept"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` into ``path`` atomically (see the module docstring)."""
    _write_atomically(Path(path), lambda fh: torch.save(obj, fh), "checkpoint")


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) into ``path`` atomically."""
    data = text.encode("utf-8")
    _write_atomically(Path(path), lambda fh: fh.write(data), "file")


def remove_stale_temporaries(folder: str | Path, older_than_s: float = 0.0) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files of interrupted atomic writes in ``folder``.

    Call it only while holding the folder's run lock (no other writer can be mid-write then).
    Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.glob(TMP_GLOB):
        try:
            if p.is_file() and now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def _numpy_array_globals() -> list[Any]:
    """What unpickling a NumPy array needs (data only, no code): checkpoints written before
    RNG states were stored as tensors hold NumPy's RNG state as an array."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    out: list[Any] = [_reconstruct, np.ndarray, np.dtype, *dtypes]
    # the name NumPy 1.x pickles under
    out.append((_reconstruct, "numpy.core.multiarray._reconstruct"))
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``); one-line CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors and plain Python "
                "values; refusing to unpickle it (it could run code)"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable ({type(exc).__name__}); it may be "
            "truncated or not a PyTorch checkpoint"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not an mtlcv checkpoint "
            "(a dict with a 'model' entry)"
        )
    return obj


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain Python values (loadable with
    ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    npy = state["numpy"]
    if isinstance(npy, tuple):  # a checkpoint written before the states were plain
        np.random.set_state(npy)
    else:
        keys = np.asarray(torch.as_tensor(npy["keys"]).numpy(), dtype=np.uint32)
        np.random.set_state(
            (npy["name"], keys, int(npy["pos"]), int(npy["has_gauss"]),
             float(npy["cached_gaussian"]))
        )
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
