"""Byte shuffle: split ``n`` items of ``itemsize`` bytes into ``itemsize`` planes of ``n`` bytes.

Plane ``b`` holds byte ``b`` of every item, so the (mostly constant) high bytes of small
multi-byte symbols end up next to each other, where a byte-oriented codec finds them.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _shuffle_kernel(src, itemsize, dst):
    n = src.size // itemsize
    for b in range(itemsize):
        base = b * n
        for i in range(n):
            dst[base + i] = src[i * itemsize + b]


@njit(cache=True)
def _unshuffle_kernel(src, itemsize, dst):
    n = src.size // itemsize
    for b in range(itemsize):
        base = b * n
        for i in range(n):
            dst[i * itemsize + b] = src[base + i]


def _as_bytes(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    if itemsize < 1:
        raise ValueError(f"itemsize must be >= 1, got {itemsize}")
    if isinstance(buf, (bytes, bytearray, memoryview)):
        b = np.frombuffer(buf, dtype=np.uint8)
    else:
        b = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    if b.size % itemsize:
        raise ValueError(f"buffer of {b.size} bytes is not a whole number of {itemsize}-byte items")
    return b


def byte_shuffle(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    """Byte planes of ``buf`` (uint8), plane 0 first; identity copy for itemsize 1."""
    b = _as_bytes(buf, itemsize)
    out = np.empty_like(b)
    _shuffle_kernel(b, itemsize, out)
    return out


def byte_unshuffle(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    """Inverse of :func:`byte_shuffle`."""
    b = _as_bytes(buf, itemsize)
    out = np.empty_like(b)
    _unshuffle_kernel(b, itemsize, out)
    return out


def byte_shuffle_ref(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    b = _as_bytes(buf, itemsize)
    return np.ascontiguousarray(b.reshape(-1, itemsize).T).reshape(-1)


def byte_unshuffle_ref(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    b = _as_bytes(buf, itemsize)
    return np.ascontiguousarray(b.reshape(itemsize, -1).T).reshape(-1)
