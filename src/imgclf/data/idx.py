"""The IDX format of (Fashion-)MNIST: a big-endian header, then raw uint8 pixels or labels.

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, one
4-byte big-endian size per dimension, then the data in C order. Only uint8 is used here.
"""

from __future__ import annotations

import math
import os
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


def _header(head: bytes, size: int, name: str) -> tuple[int, tuple[int, ...]]:
    """(offset of the data, shape) from the first bytes of an IDX file of `size` bytes in all."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    if head[2] != _UBYTE:
        raise DataError(f"{name}: IDX element type 0x{head[2]:02x} is not supported (only uint8)")
    ndim = head[3]
    if ndim == 0 or len(head) < 4 + 4 * ndim:
        raise DataError(f"{name}: IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    # Exact Python integers: np.prod in int64 wraps around for huge dimensions (65536**4 == 0),
    # which would let a forged header "match" an empty payload and then fail to reshape.
    expected = math.prod(shape)
    payload = size - 4 - 4 * ndim
    if payload != expected:
        raise DataError(f"{name}: header says {expected} bytes of data for shape {shape}, file has {payload}")
    return 4 + 4 * ndim, shape


def _unsupported(name: str, shape: tuple[int, ...], exc: ValueError) -> DataError:
    # The header is self-consistent but numpy cannot hold it (more than 64 dimensions).
    return DataError(f"{name}: IDX shape {shape} is not supported ({exc})")


def decode(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking the header against the payload size."""
    offset, shape = _header(data, len(data), name)
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()
    except ValueError as exc:
        raise _unsupported(name, shape, exc) from None


def read(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return decode(data, str(path))


def open_map(path: Path) -> np.ndarray:
    """An IDX file as a read-only memory map, its header checked as `decode` checks it: nothing
    of the data is read until used (preprocessing gathers the splits' rows from it)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4 + 4 * 255)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    offset, shape = _header(head, size, str(path))
    try:
        if not math.prod(shape):
            return np.zeros(shape, dtype=np.uint8)  # nothing to map (mmap refuses a length of 0)
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
    except ValueError as exc:
        raise _unsupported(str(path), shape, exc) from None
