"""The greedy per-row predictor choice of the entropy coder's ``ref`` model, one row at a time.

Each row looks at every earlier row and every earlier group of rows (O(rows^2) per tensor), and
numpy paid a dozen calls per row for it. The choice only steers the fit (``log2`` from libm), so
this kernel may differ from its reference in the last ulps of a gain; ``coding.entropy_models``
keeps the numpy reference, ``fit_row_prediction_ref``, beside the call.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _gain(cpx, cpp, nrm_r, e0, cols, floor, side, den, kmax):
    """(estimated bits saved, coefficient) of predicting a row of energy ``nrm_r`` from a
    reference with dot product ``cpx`` and energy ``cpp``; -inf where the coefficient rounds to 0."""
    k = min(max(np.rint(den * cpx / (cpp if cpp > 0 else 1.0)), -kmax), kmax)
    if k == 0:
        return -np.inf, k
    c = k / den
    e = max(nrm_r - 2 * c * cpx + c * c * cpp, 0.0) + cols / 12.0
    return 0.5 * cols * math.log2(e0 / max(e + floor, 1e-9)) - side - 4.0, k


@njit(cache=True, nogil=True)
def _rows_kernel(gram, nrm, b0, cols, floor, den, kmax, state, group_of, counts, ss, active,
                 mode, ref_out, coef_out, group_mode, row_mode):
    """Rows b0 .. b0 + gram.shape[1] - 1; ``state`` = [ngroups, nactive]. Per row: the chosen
    mode, the reference (earlier row index or active-group position) and the coefficient."""
    b1, block = gram.shape
    ngroups, nactive = state[0], state[1]
    dots = np.zeros(b1 + 1)
    for j in range(block):
        r = b0 + j
        e0 = nrm[r] + floor
        for g in range(ngroups + 1):
            dots[g] = 0.0
        for i in range(r):
            dots[group_of[i]] += gram[i, j]
        best_gain = 0.0
        best_kind, best_i, best_k = -1, -1, 0
        if r > 0:
            side = math.log2(r) + 1.5
            gain_max, arg, karg = -np.inf, -1, 0.0
            for i in range(r):
                gain, k = _gain(gram[i, j], nrm[i], nrm[r], e0, cols, floor, side, den, kmax)
                if gain > gain_max:
                    gain_max, arg, karg = gain, i, k
            if arg >= 0 and gain_max > best_gain:
                best_gain, best_kind, best_i, best_k = gain_max, row_mode, arg, karg
            if nactive:
                side = math.log2(nactive) + 1.5
                gain_max, arg, karg = -np.inf, -1, 0.0
                for a in range(nactive):
                    g = active[a]
                    n = float(counts[g])
                    gain, k = _gain(dots[g] / n, ss[g] / n**2, nrm[r], e0, cols, floor, side, den, kmax)
                    if gain > gain_max:
                        gain_max, arg, karg = gain, a, k
                if arg >= 0 and gain_max > best_gain:
                    best_gain, best_kind, best_i, best_k = gain_max, group_mode, arg, karg
        if best_kind < 0:
            g = ngroups
            ngroups += 1
        else:
            mode[r] = best_kind
            coef_out[r] = int(best_k)
            if best_kind == row_mode:
                ref_out[r] = r - 1 - best_i
                g = group_of[best_i]
            else:
                ref_out[r] = best_i
                g = active[best_i]
        # Group bookkeeping mirrors run_row_prediction: a row joins its reference's group.
        ss[g] += 2.0 * dots[g] + nrm[r]
        group_of[r] = g
        counts[g] += 1
        if counts[g] == 2:
            active[nactive] = g
            nactive += 1
    state[0], state[1] = ngroups, nactive


def choose_row_predictors(x: np.ndarray, den: int, kmax: int, group_mode: int, row_mode: int, block: int = 256):
    """Per row of ``x`` (rows, cols): mode (0 none, ``group_mode``, ``row_mode``), reference
    (row mode: rows back - 1; group mode: position among the groups active then) and coefficient, as
    ``coding.entropy_models.fit_row_prediction`` defines them."""
    rows, cols = x.shape
    mode = np.zeros(rows, np.int64)
    ref = np.zeros(rows, np.int64)
    coef = np.zeros(rows, np.int64)
    xf = x.astype(np.float32)
    nrm = (x.astype(np.float64) ** 2).sum(axis=1)
    floor = 0.1 * cols
    group_of = np.zeros(rows, np.int64)
    counts = np.zeros(rows + 1, np.int64)
    ss = np.zeros(rows + 1)
    active = np.zeros(rows + 1, np.int64)
    state = np.zeros(2, np.int64)
    for b0 in range(0, rows, block):
        b1 = min(rows, b0 + block)
        gram = (xf[:b1] @ xf[b0:b1].T).astype(np.float64)
        _rows_kernel(np.ascontiguousarray(gram), nrm, b0, cols, floor, float(den), float(kmax), state,
                     group_of, counts, ss, active, mode, ref, coef, group_mode, row_mode)
    return mode, ref, coef
