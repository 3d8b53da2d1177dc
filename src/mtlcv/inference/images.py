"""Finding and reading the images to predict on.

``--input`` takes files, folders (their files, not recursing; hidden files are left out) and glob
patterns (``"photos/**/*.jpg"``, quoted so that mtlcv expands it; ``**`` recurses). Every file
found is tried: a file Pillow cannot read is named and skipped by the caller, never silently
dropped. An input that names nothing (a missing path, an empty folder, a pattern matching no
file) is a :class:`~mtlcv.errors.DataError` (exit code 2).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError


def find_images(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named by ``specs`` (files, folders, globs), in order, each once."""
    if not specs:
        raise DataError("--input: expected at least one image file, folder or glob pattern")
    files: list[Path] = []
    for spec in specs:
        text = os.path.expanduser(str(spec))
        path = Path(text)
        if path.is_dir():
            found = sorted(
                f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")
            )
            if not found:
                raise DataError(f"--input {str(spec)!r}: the folder holds no files")
        elif path.is_file():
            found = [path]
        elif any(c in text for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"--input {str(spec)!r}: the pattern matches no file")
        else:
            raise DataError(f"--input {str(spec)!r}: no such file or folder")
        files += found
    return list(dict.fromkeys(files))


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """The image in ``path`` as RGB floats ``[3, H, W]`` in [0, 1].

    EXIF orientation is applied (a phone's portrait photo comes out upright); greyscale is
    repeated over the three channels, an alpha channel is dropped, 16-bit images keep their
    precision. A file Pillow cannot read raises a one-line DataError naming it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return pil_to_tensor(im)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: unreadable image ({reason})") from None


def pil_to_tensor(im) -> torch.Tensor:  # noqa: ANN001 - PIL is imported lazily
    """A PIL image as RGB floats ``[3, H, W]`` in [0, 1] (see :func:`read_image`)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    elif im.mode == "F":
        a = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    else:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.unsqueeze(0).repeat(3, 1, 1) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
