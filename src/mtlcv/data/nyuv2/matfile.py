"""Read the numeric variables of a MATLAB ``.mat`` file without SciPy.

Two formats exist: v7.3 files are HDF5 (read with h5py; MATLAB's column-major arrays appear
with their axes reversed) and older files use the "Level 5 MAT-file" format (MathWorks,
*MAT-File Format*, 2021, ch. 1): a 128-byte header, then tagged data elements, each variable a
``miMATRIX`` element (array flags, dimensions, name, real part), possibly wrapped in a
zlib-compressed ``miCOMPRESSED`` element. The official NYUv2 ``splits.mat`` is of the latter
kind. Only numeric arrays are decoded (cells, structs, chars and sparse arrays are skipped),
which covers split indices and class-mapping vectors. Both readers return arrays in MATLAB's
axis order.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import h5py
import numpy as np

from ...errors import DataError

# data element types (miINT8 ... miUINT64) -> NumPy dtype codes
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
# numeric array classes (mxDOUBLE_CLASS ... mxUINT64_CLASS) -> NumPy dtype codes
_MX = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8",
       15: "u8"}  # fmt: skip


def _elements(buf: bytes, end: str):
    """Yield ``(type, payload)`` for each data element of ``buf`` (8-byte aligned)."""
    pos = 0
    while pos + 8 <= len(buf):
        typ, nbytes = struct.unpack(end + "II", buf[pos : pos + 8])
        if typ >> 16:  # small data element: size and type share the first 4 bytes
            typ, nbytes = typ & 0xFFFF, typ >> 16
            yield typ, buf[pos + 4 : pos + 4 + nbytes]
            pos += 8
            continue
        yield typ, buf[pos + 8 : pos + 8 + nbytes]
        pos += 8 + nbytes + (-nbytes % 8 if typ != _MI_COMPRESSED else 0)


def _matrix(payload: bytes, end: str) -> tuple[str, np.ndarray | None]:
    parts = list(_elements(payload, end))
    flags = struct.unpack(end + "I", parts[0][1][:4])[0]
    mx = flags & 0xFF
    dims = np.frombuffer(parts[1][1], end + _MI[parts[1][0]]).astype(int)
    name = parts[2][1].decode("ascii", "replace")
    if mx not in _MX or len(parts) < 4 or parts[3][0] not in _MI:
        return name, None
    data = np.frombuffer(parts[3][1], end + _MI[parts[3][0]]).astype(_MX[mx])
    return name, data.reshape(tuple(dims), order="F")


def _read_v5(path: Path, buf: bytes) -> dict[str, np.ndarray]:
    if len(buf) < 128 or buf[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{path}: not a MATLAB .mat file (neither HDF5 v7.3 nor Level 5)")
    end = "<" if buf[126:128] == b"IM" else ">"
    out: dict[str, np.ndarray] = {}
    try:
        for typ, payload in _elements(buf[128:], end):
            if typ == _MI_COMPRESSED:
                typ, payload = next(_elements(zlib.decompress(payload), end))
            if typ == _MI_MATRIX:
                name, arr = _matrix(payload, end)
                if arr is not None:
                    out[name] = arr
    except (struct.error, zlib.error, ValueError, IndexError, StopIteration) as e:
        raise DataError(f"{path}: corrupt MATLAB Level 5 file ({e})") from None
    return out


def read_mat(path: str | Path) -> dict[str, np.ndarray]:
    """Every numeric variable of the ``.mat`` file ``path`` as ``{name: array}`` (MATLAB axes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if h5py.is_hdf5(path):
        out = {}
        with h5py.File(path, "r") as f:
            for name, item in f.items():
                if isinstance(item, h5py.Dataset) and item.dtype.kind in "fiub":
                    out[name] = np.asarray(item).T  # h5py shows MATLAB's axes reversed
        return out
    return _read_v5(path, path.read_bytes())
