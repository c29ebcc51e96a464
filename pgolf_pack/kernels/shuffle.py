"""Byte shuffle: split ``n`` items of ``itemsize`` bytes into ``itemsize`` planes of ``n`` bytes.

Plane ``b`` holds byte ``b`` of every item, so the (mostly constant) high bytes of small
multi-byte symbols end up next to each other, where a byte-oriented codec finds them.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _shuffle_kernel(src, itemsize, dst):
    n = src.size // itemsize
    for b in range(itemsize):
        base = b * n
        for i in range(n):
            dst[base + i] = src[i * itemsize + b]


@njit(cache=True, nogil=True)
def _unshuffle_kernel(src, itemsize, dst):
    n = src.size // itemsize
    for b in range(itemsize):
        base = b * n
        for i in range(n):
            dst[i * itemsize + b] = src[base + i]


# Word-sized items get their own kernels: a constant byte count lets LLVM unroll and vectorize
# the inner loop (~30x faster than the generic byte loop on 17M int16 items).


@njit(cache=True, nogil=True)
def _shuffle2(words, dst):
    n = words.size
    for i in range(n):
        w = words[i]
        dst[i] = np.uint8(w & np.uint16(0xFF))
        dst[n + i] = np.uint8(w >> np.uint16(8))


@njit(cache=True, nogil=True)
def _unshuffle2(src, words):
    n = words.size
    for i in range(n):
        words[i] = np.uint16(src[i]) | (np.uint16(src[n + i]) << np.uint16(8))


@njit(cache=True, nogil=True)
def _shuffle4(words, dst):
    n = words.size
    for i in range(n):
        w = words[i]
        for b in range(4):
            dst[b * n + i] = np.uint8((w >> np.uint32(8 * b)) & np.uint32(0xFF))


@njit(cache=True, nogil=True)
def _unshuffle4(src, words):
    n = words.size
    for i in range(n):
        w = np.uint32(0)
        for b in range(4):
            w |= np.uint32(src[b * n + i]) << np.uint32(8 * b)
        words[i] = w


@njit(cache=True, nogil=True)
def _shuffle8(words, dst):
    n = words.size
    for i in range(n):
        w = words[i]
        for b in range(8):
            dst[b * n + i] = np.uint8((w >> np.uint64(8 * b)) & np.uint64(0xFF))


@njit(cache=True, nogil=True)
def _unshuffle8(src, words):
    n = words.size
    for i in range(n):
        w = np.uint64(0)
        for b in range(8):
            w |= np.uint64(src[b * n + i]) << np.uint64(8 * b)
        words[i] = w


# The word kernels take byte 0 as the low byte, true only on little-endian hosts.
_WORD_KERNELS = (
    {2: (np.uint16, _shuffle2, _unshuffle2), 4: (np.uint32, _shuffle4, _unshuffle4), 8: (np.uint64, _shuffle8, _unshuffle8)}
    if sys.byteorder == "little"
    else {}
)


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
    if itemsize in _WORD_KERNELS:
        word, kernel, _ = _WORD_KERNELS[itemsize]
        kernel(b.view(word), out)
    else:
        _shuffle_kernel(b, itemsize, out)
    return out


def byte_unshuffle(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    """Inverse of :func:`byte_shuffle`."""
    b = _as_bytes(buf, itemsize)
    out = np.empty_like(b)
    if itemsize in _WORD_KERNELS:
        word, _, kernel = _WORD_KERNELS[itemsize]
        kernel(b, out.view(word))
    else:
        _unshuffle_kernel(b, itemsize, out)
    return out


def byte_shuffle_ref(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    b = _as_bytes(buf, itemsize)
    return np.ascontiguousarray(b.reshape(-1, itemsize).T).reshape(-1)


def byte_unshuffle_ref(buf: np.ndarray | bytes, itemsize: int) -> np.ndarray:
    b = _as_bytes(buf, itemsize)
    return np.ascontiguousarray(b.reshape(itemsize, -1).T).reshape(-1)
