"""The IDX file format of MNIST and Fashion-MNIST: read and write, gzip or raw.

An IDX file is a 4-byte magic number ``0x00 0x00 TYPE NDIM``, then NDIM
big-endian uint32 dimensions, then the data in row-major order, big-endian.
See http://yann.lecun.com/exdb/mnist/ (section "THE IDX FILE FORMAT").

    >>> write_idx(tmp / "x.gz", np.zeros((2, 3), np.uint8))
    >>> read_idx(tmp / "x.gz").shape
    (2, 3)
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "write_idx"]

# IDX type byte -> big-endian numpy dtype.
_TYPE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_TO_TYPE: dict[str, int] = {dt.newbyteorder("=").str: t for t, dt in _TYPE_TO_DTYPE.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip stream (detected by content)."""
    data = path.read_bytes()
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        # EOFError is what a truncated .gz gives; BadGzipFile (an OSError) a damaged one.
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a native-endian numpy array.

    Args:
        path: the file. Gzip is detected from the content, not the suffix.

    Returns:
        An array with the file's dimensions and dtype (uint8 for MNIST images and
        labels). Read-only when the dtype is uint8 (it views the file's bytes).

    Raises:
        ValueError: a bad magic number, an unknown type code, or a size that does
            not match the header (truncated or trailing bytes); the message names
            the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, header needs 4)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _TYPE_TO_DTYPE or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}; expected 0x0000TTNN with type TT in "
            f"{{{', '.join(f'0x{t:02x}' for t in _TYPE_TO_DTYPE)}}} and NN >= 1 dimensions"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _TYPE_TO_DTYPE[type_code]
    count = math.prod(dims)
    expected = count * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes in"
        raise ValueError(
            f"{path}: {what} IDX file: header says shape {tuple(dims)} of {dtype.name} "
            f"= {expected} data bytes, file has {got}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return array


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``.

    Args:
        path: destination file.
        array: at least 1-D, dtype one of uint8, int8, int16, int32, float32, float64.

    Returns:
        The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str
    if key not in _DTYPE_TO_TYPE:
        allowed = ", ".join(dt.newbyteorder("=").name for dt in _TYPE_TO_DTYPE.values())
        raise ValueError(f"write_idx: dtype {array.dtype} has no IDX code; allowed: {allowed}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: array must have 1..255 dimensions, got {array.ndim}")
    type_code = _DTYPE_TO_TYPE[key]
    header = struct.pack(">HBB", 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_TYPE_TO_DTYPE[type_code]).tobytes()
    payload = header + body
    if path.suffix == ".gz":
        # mtime=0 keeps the output byte-identical across runs.
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
