"""The IDX format of (Fashion-)MNIST: a big-endian header, then raw uint8 pixels or labels.

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, one
4-byte big-endian size per dimension, then the data in C order. Only uint8 is used here.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from imgclf.errors import DataError

_UBYTE = 0x08


def encode(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array (used by tests to make real-format fixtures)."""
    if array.dtype != np.uint8:
        raise ValueError(f"IDX encoding supports uint8 only, got {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, _UBYTE, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def decode(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking the header against the payload size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    if data[2] != _UBYTE:
        raise DataError(f"{name}: IDX element type 0x{data[2]:02x} is not supported (only uint8)")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{name}: IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    # Exact Python integers: np.prod in int64 wraps around for huge dimensions (65536**4 == 0),
    # which would let a forged header "match" an empty payload and then fail to reshape.
    expected = math.prod(shape)
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        raise DataError(f"{name}: header says {expected} bytes of data for shape {shape}, file has {payload}")
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()
    except ValueError as exc:
        # The header is self-consistent but numpy cannot hold it (more than 64 dimensions).
        raise DataError(f"{name}: IDX shape {shape} is not supported ({exc})") from None


def read(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return decode(data, str(path))
