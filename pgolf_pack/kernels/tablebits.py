"""Size of a count table's Exp-Golomb coding (the entropy coder's side information), in one pass.

The encoder prices many candidate tables while fitting (every side stream, every precision), so
this integer-only count runs as a kernel; the table is written by ``entropy_models.write_table``
with the order chosen here. Tokens: each nonzero entry is ``eg(v, k)``; each run of zeros is one
``eg(0, k)`` plus ``eg(run - 1, 0)``; 5 bits hold k.
"""

from __future__ import annotations

import numpy as np
from numba import njit

MAX_ORDER = 24


@njit(cache=True, nogil=True, inline="always")
def _eg_bits(v, k):
    w = v + (np.int64(1) << k)
    top = 0
    while (w >> (top + 1)) > 0:
        top += 1
    return 2 * (top - k) + k + 1


@njit(cache=True, nogil=True)
def _table_bits_kernel(t):
    n = t.shape[0]
    lens = np.zeros(MAX_ORDER + 1, np.int64)
    ntok = 0
    run_bits = 0
    i = 0
    while i < n:
        if t[i] == 0:
            j = i
            while j < n and t[j] == 0:
                j += 1
            run_bits += _eg_bits(np.int64(j - i - 1), 0)
            for k in range(MAX_ORDER + 1):
                lens[k] += k + 1  # eg(0, k)
            i = j
        else:
            for k in range(MAX_ORDER + 1):
                lens[k] += _eg_bits(np.int64(t[i]), k)
            i += 1
        ntok += 1
    if ntok == 0:
        return 5, 0
    # First minimum, scanning k upwards until the length starts growing (it is unimodal in k).
    best_b, best_k = lens[0] + run_bits + 5, 0
    for k in range(1, MAX_ORDER + 1):
        b = lens[k] + run_bits + 5
        if b < best_b:
            best_b, best_k = b, k
        elif b > best_b:
            break
    return best_b, best_k


def table_bits(t: np.ndarray) -> tuple[int, int]:
    """(bits, order k) of the cheapest Exp-Golomb coding of a count table (5 bits for k)."""
    b, k = _table_bits_kernel(np.ascontiguousarray(np.asarray(t, dtype=np.int64).reshape(-1)))
    return int(b), int(k)


def _eg_len_ref(v: np.ndarray, k) -> np.ndarray:
    w = np.asarray(v, dtype=np.int64) + (np.int64(1) << np.asarray(k, dtype=np.int64))
    top = np.floor(np.log2(w)).astype(np.int64)
    top = np.where((w >> top) == 0, top - 1, top)
    top = np.where((w >> (top + 1)) > 0, top + 1, top)
    return 2 * (top - k) + k + 1


def table_bits_ref(t: np.ndarray) -> tuple[int, int]:
    """Numpy reference for :func:`table_bits`."""
    t = np.asarray(t, dtype=np.int64).reshape(-1)
    if t.size == 0:
        return 5, 0
    zero = t == 0
    starts = zero & np.r_[True, ~zero[:-1]]
    vals = t[~zero]
    run_lens = np.diff(np.r_[np.flatnonzero(np.diff(np.r_[0, zero.astype(np.int8), 0]))])[::2]
    run_bits = int(_eg_len_ref(run_lens - 1, 0).sum()) if run_lens.size else 0
    orders = np.arange(MAX_ORDER + 1, dtype=np.int64)
    nz_bits = _eg_len_ref(vals[None, :], orders[:, None]).sum(axis=1) if vals.size else np.zeros(MAX_ORDER + 1, np.int64)
    lens = (nz_bits + int(starts.sum()) * (orders + 1) + run_bits + 5).tolist()
    best = None
    for k, b in enumerate(lens):
        if best is None or b < best[0]:
            best = (b, k)
        elif b > best[0]:
            break
    return best
