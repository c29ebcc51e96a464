"""Summed code lengths for the entropy coder's fits, bit-identical to the numpy expressions they replace.

The fits pick the cheapest candidate by comparing float sums, so a kernel that summed in another
order could flip a near tie and change the artifact. ``_pairwise`` therefore repeats numpy's
float64 ``add.reduce`` along a contiguous axis (sequential below 8 elements, 8-way unrolled
up to 128, split in halves at multiples of 8 above); sums across rows are sequential,
as numpy adds rows one after another. ``tests/test_kernels.py`` checks both against numpy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_BLOCK = 128  # numpy's PW_BLOCKSIZE


@njit(cache=True, nogil=True, inline="always")
def _pw(a, lo, n):
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    if n <= _BLOCK:
        r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
        r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
        i = 8
        stop = n - n % 8
        while i < stop:
            r0 += a[lo + i]
            r1 += a[lo + i + 1]
            r2 += a[lo + i + 2]
            r3 += a[lo + i + 3]
            r4 += a[lo + i + 4]
            r5 += a[lo + i + 5]
            r6 += a[lo + i + 6]
            r7 += a[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    return -1.0  # never reached: callers split above _BLOCK


@njit(cache=True, nogil=True)
def _pairwise_rest(a, lo, n):
    # numpy's recursion (halves at multiples of 8 above _BLOCK) as a post-order walk over an
    # explicit stack: numba compiles recursion poorly, and the sums must combine in the same tree.
    if n <= _BLOCK:
        return _pw(a, lo, n)
    t_lo = np.empty(64, np.int64)
    t_n = np.empty(64, np.int64)
    t_st = np.empty(64, np.int64)
    vals = np.empty(64)
    top, nv = 0, 0
    t_lo[0], t_n[0], t_st[0] = lo, n, 0
    while top >= 0:
        blo, bn, st = t_lo[top], t_n[top], t_st[top]
        if bn <= _BLOCK:
            vals[nv] = _pw(a, blo, bn)
            nv += 1
            top -= 1
            continue
        n2 = bn // 2
        n2 -= n2 % 8
        if st == 0:
            t_st[top] = 1
            top += 1
            t_lo[top], t_n[top], t_st[top] = blo, n2, 0
        elif st == 1:
            t_st[top] = 2
            top += 1
            t_lo[top], t_n[top], t_st[top] = blo + n2, bn - n2, 0
        else:
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
            top -= 1
    return vals[0]


@njit(cache=True, nogil=True)
def _reduce(a, n):
    """numpy's ``a[:n].sum()`` for a contiguous float64 buffer."""
    return _pairwise_rest(a, 0, n)


@njit(cache=True, nogil=True)
def _row_costs_kernel(y, cst):
    rows, cols = y.shape
    out = np.empty(rows)
    buf = np.empty(cols)
    for r in range(rows):
        for c in range(cols):
            buf[c] = cst[c, y[r, c]]
        out[r] = _reduce(buf, cols)
    return out


def row_costs(y: np.ndarray, cst: np.ndarray) -> np.ndarray:
    """Per row r: sum over columns c of ``cst[c, y[r, c]]`` (bits of each row under per-column tables)."""
    return _row_costs_kernel(np.ascontiguousarray(y), np.ascontiguousarray(cst, dtype=np.float64))


def row_costs_ref(y: np.ndarray, cst: np.ndarray) -> np.ndarray:
    """Numpy reference for :func:`row_costs`."""
    return cst[np.arange(y.shape[1])[None, :], y].sum(axis=1)


@njit(cache=True, nogil=True)
def _offset_pass_kernel(y, line, other, mcol, flat, s_lo, s_hi, m_n, n, window, axis):
    rows, cols = y.shape
    nl = line.shape[0]
    best_c = np.full(nl, np.inf)
    best_s = line.copy()
    if axis == 0:
        buf = np.empty(cols)
        for r in range(rows):
            for d in range(-window, window + 1):
                cand = line[r] + d
                for c in range(cols):
                    s = cand + other[c]
                    if s < s_lo or s > s_hi:
                        buf[c] = 1e9
                    else:
                        buf[c] = flat[((s - s_lo) * m_n + mcol[c]) * n + y[r, c]]
                tot = _reduce(buf, cols)
                if tot < best_c[r]:
                    best_c[r] = tot
                    best_s[r] = cand
    else:
        acc = np.empty(cols)
        for d in range(-window, window + 1):
            # Rows are added one after another, as numpy reduces over the leading axis.
            for r in range(rows):
                u = other[r]
                for c in range(cols):
                    s = u + line[c] + d
                    if s < s_lo or s > s_hi:
                        x = 1e9
                    else:
                        x = flat[((s - s_lo) * m_n + mcol[c]) * n + y[r, c]]
                    if r == 0:
                        acc[c] = x
                    else:
                        acc[c] += x
            for c in range(cols):
                tot = acc[c] if rows else 0.0
                if tot < best_c[c]:
                    best_c[c] = tot
                    best_s[c] = line[c] + d
    return best_s


def offset_pass(y, line, other, mcol, flat, s_lo, s_hi, m_n, window, axis) -> np.ndarray:
    """One pass of the row-offset / column-scale fit: the best of line +- window per line.

    Symbol (r, c) has key scale ``u_r + v_c`` and mean row ``mcol[c]`` into ``flat``, a dense
    ((S * M) * n) cost table starting at scale ``s_lo``; keys outside [s_lo, s_hi] cost 1e9.
    ``axis`` 0 moves the row offsets (``line`` = u, ``other`` = v), 1 the column scales.
    """
    n = flat.size // ((s_hi - s_lo + 1) * m_n)
    return _offset_pass_kernel(np.ascontiguousarray(y), np.asarray(line, np.int64), np.asarray(other, np.int64),
                               np.asarray(mcol, np.int64), flat, int(s_lo), int(s_hi), int(m_n), int(n), int(window), int(axis))


def offset_pass_ref(y, line, other, mcol, flat, s_lo, s_hi, m_n, window, axis) -> np.ndarray:
    """Numpy reference for :func:`offset_pass` (the loop ``fit_rc_offsets`` ran before the kernel)."""
    n = flat.size // ((s_hi - s_lo + 1) * m_n)
    best_c = np.full(len(line), np.inf)
    best_s = np.asarray(line, np.int64).copy()
    mrow = np.asarray(mcol, np.int64)[None, :]
    for d in range(-window, window + 1):
        cand = line + d
        s = (cand[:, None] + other[None, :]) if axis == 0 else (other[:, None] + cand[None, :])
        ok = (s >= s_lo) & (s <= s_hi)
        idx = ((np.clip(s, s_lo, s_hi) - s_lo) * m_n + mrow) * n + y
        c = np.where(ok, flat[idx], 1e9).sum(axis=1 - axis)
        better = c < best_c
        best_c = np.where(better, c, best_c)
        best_s = np.where(better, cand, best_s)
    return best_s


@njit(cache=True, nogil=True)
def _best_prior_rho2_kernel(gram, nrm, b0):
    b1, block = gram.shape
    out = np.empty(block)
    for j in range(block):
        r = b0 + j
        best = 0.0  # rows at or after r count as 0, as the masked numpy expression has it
        for i in range(r):
            g = gram[i, j]
            v = g * g / max(nrm[i] * nrm[r], 1e-9)
            if v > best:
                best = v
        out[j] = min(max(best, 0.0), 1.0)
    return out


def best_prior_rho2(gram: np.ndarray, nrm: np.ndarray, b0: int) -> np.ndarray:
    """Per column j (row ``b0 + j``): the largest squared correlation with an earlier row,
    ``gram[i, j]**2 / max(nrm[i] * nrm[b0 + j], 1e-9)`` over i < b0 + j, clipped to [0, 1].
    Every step is one correctly rounded IEEE operation, so it equals the numpy expression."""
    return _best_prior_rho2_kernel(np.ascontiguousarray(gram, dtype=np.float64), np.ascontiguousarray(nrm, dtype=np.float64), int(b0))


def best_prior_rho2_ref(gram: np.ndarray, nrm: np.ndarray, b0: int) -> np.ndarray:
    """Numpy reference for :func:`best_prior_rho2` (the expression ``single_ref_share`` used)."""
    b1, block = gram.shape
    mask = np.arange(b1)[:, None] < np.arange(b0, b0 + block)[None, :]
    rho2 = np.where(mask, gram**2 / np.maximum(np.outer(nrm[:b1], nrm[b0:b0 + block]), 1e-9), 0.0)
    return np.clip(rho2.max(axis=0), 0.0, 1.0)
