"""Symbol counts over a closed integer range, the input to entropy bounds and coder tables."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _histogram_kernel(values, lo, counts):
    hi = lo + counts.size - 1
    outside = 0
    for i in range(values.size):
        v = np.int64(values[i])
        if v < lo or v > hi:
            outside += 1
        else:
            counts[v - lo] += 1
    return outside


def _check(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    v = np.ascontiguousarray(values).reshape(-1)
    if v.dtype.kind not in "iu":
        raise TypeError(f"histogram needs integer symbols, got {v.dtype}")
    if hi < lo:
        raise ValueError(f"empty range [{lo}, {hi}]")
    return v


def symbol_counts(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Counts (int64, length ``hi - lo + 1``) of each symbol in ``[lo, hi]``.

    Raises ValueError when a symbol lies outside the range, so no symbol is silently dropped.
    """
    v = _check(values, lo, hi)
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    outside = _histogram_kernel(v, np.int64(lo), counts)
    if outside:
        raise ValueError(f"{outside} symbols lie outside [{lo}, {hi}]")
    return counts


def symbol_counts_ref(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    v = _check(values, lo, hi).astype(np.int64)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"symbols lie outside [{lo}, {hi}]")
    return np.bincount(v - lo, minlength=hi - lo + 1).astype(np.int64)
