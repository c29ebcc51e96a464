"""Encoder-side reordering for the entropy coder: symbols grouped by context, escape mantissas.

Both replace numpy sorts that dominated ``EntropyModel`` assembly (an ``argsort`` of every
symbol, several times per model) with O(n) counting passes; the outputs are the same arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _stable_order_kernel(keys, k):
    counts = np.zeros(k + 1, np.int64)
    for i in range(keys.shape[0]):
        counts[keys[i] + 1] += 1
    for j in range(k):
        counts[j + 1] += counts[j]
    out = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        key = keys[i]
        out[counts[key]] = i
        counts[key] += 1
    return out


def stable_order(keys: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for integer keys in [0, k) (a counting sort)."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if keys.size and (int(keys.min()) < 0 or int(keys.max()) >= k):
        raise ValueError(f"keys must lie in [0, {k})")
    return _stable_order_kernel(keys, int(k))


def stable_order_ref(keys: np.ndarray, k: int) -> np.ndarray:
    """Numpy reference for :func:`stable_order`."""
    return np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")


@njit(cache=True, nogil=True)
def _pack_mantissas_kernel(buckets, mant, nbits):
    out = np.zeros((nbits + 7) // 8, np.uint8)
    top = 0
    for i in range(buckets.shape[0]):
        top = max(top, buckets[i])
    # Bucket k's mantissas start after all smaller buckets' bits and keep their input order
    # (a stable sort by bucket), so each value's bit position is known in one pass.
    start = np.zeros(top + 1, np.int64)
    for i in range(buckets.shape[0]):
        start[buckets[i]] += buckets[i]
    acc = 0
    for k in range(top + 1):
        acc, start[k] = acc + start[k], acc
    for i in range(buckets.shape[0]):
        k = buckets[i]
        pos = start[k]
        m = mant[i]
        for b in range(k - 1, -1, -1):
            if (m >> b) & 1:
                out[pos >> 3] |= np.uint8(0x80 >> (pos & 7))
            pos += 1
        start[k] = pos
    return out


def pack_mantissas(buckets: np.ndarray, mant: np.ndarray) -> bytes:
    """Escape mantissas, ``buckets[i]`` bits each (MSB first), grouped by increasing bucket in a
    stable order, packed MSB first into bytes (the layout ``entropy_decode`` reads)."""
    b = np.ascontiguousarray(buckets, dtype=np.int64)
    nbits = int(b.sum())
    if nbits == 0:
        return b""
    return _pack_mantissas_kernel(b, np.ascontiguousarray(mant, dtype=np.int64), nbits).tobytes()


def pack_mantissas_ref(buckets: np.ndarray, mant: np.ndarray) -> bytes:
    """Numpy reference for :func:`pack_mantissas`."""
    order = np.argsort(buckets, kind="stable")
    b, m = buckets[order], mant[order]
    parts = []
    for k in np.unique(b):
        if k == 0:
            continue
        sel = m[b == k]
        parts.append(((sel[:, None] >> np.arange(k - 1, -1, -1)[None, :]) & 1).astype(np.uint8).ravel())
    return np.packbits(np.concatenate(parts)).tobytes() if parts else b""


@njit(cache=True, nogil=True)
def _escape_parts_kernel(v, clo, chi):
    n = v.shape[0]
    buckets = np.empty(n, np.int64)
    mant = np.empty(n, np.int64)
    for i in range(n):
        w = clo - v[i] if v[i] < clo else v[i] - chi
        b = 0
        while (w >> (b + 1)) > 0:
            b += 1
        buckets[i] = b
        mant[i] = w - (np.int64(1) << b)
    return buckets, mant


def escape_parts(values: np.ndarray, clo: int, chi: int) -> tuple[np.ndarray, np.ndarray]:
    """(bit length - 1, mantissa) of each escaped value's distance past the core [clo, chi]."""
    return _escape_parts_kernel(np.ascontiguousarray(values, dtype=np.int64), int(clo), int(chi))


def escape_parts_ref(values: np.ndarray, clo: int, chi: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of :func:`escape_parts`."""
    v = np.asarray(values, dtype=np.int64)
    w = np.where(v < clo, clo - v, v - chi).astype(np.int64)
    b = np.floor(np.log2(np.maximum(w, 1).astype(np.float64))).astype(np.int64)
    b = np.where((w >> b) == 0, b - 1, b)
    b = np.where((w >> (b + 1)) > 0, b + 1, b)
    return b, w - (np.int64(1) << b)


@njit(cache=True, nogil=True)
def _line_hists_kernel(y, n, axis):
    rows, cols = y.shape
    h = np.zeros((cols if axis == 1 else rows, n), np.int64)
    for r in range(rows):
        for c in range(cols):
            if axis == 1:
                h[c, y[r, c]] += 1
            else:
                h[r, y[r, c]] += 1
    return h


def line_hists(y: np.ndarray, n: int, axis: int) -> np.ndarray:
    """(lines, n) counts of symbols 0..n-1 per column (axis=1) or per row (axis=0) of ``y``."""
    y = np.asarray(y)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= n):
        raise ValueError(f"symbols must lie in [0, {n})")
    return _line_hists_kernel(np.ascontiguousarray(y), int(n), int(axis))


def line_hists_ref(y: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Numpy reference for :func:`line_hists`."""
    yy = y if axis == 1 else y.T
    c = yy.shape[1]
    idx = yy.astype(np.int64) + (np.arange(c, dtype=np.int64) * n)[None, :]
    return np.bincount(idx.ravel(), minlength=c * n).reshape(c, n)
