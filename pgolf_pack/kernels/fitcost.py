"""Code lengths of the parametric tables for the entropy fits, one fused pass per key.

The fits price tens of thousands of (scale index, mean index) keys, each a table over the whole
core alphabet; as numpy expressions that was a dozen temporaries per entry and most of a
wide-alphabet fit. These lengths only steer the fits' choices (libm ``exp``, sequential sums),
so they may differ from the numpy reference in the last ulps; the coder's own tables stay in
``coding.entropy_tables``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_GAUSS, _LAPLACE = 0, 1
_LN2 = 6.93147180369123816490e-01 + 1.90821492927058770002e-10
_SQRT1_2 = 0.70710678118654752440
_FLOOR = 2.0**-24  # entropy_tables.ANS_PRECISION
_ERFC_COEF = np.array([
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
])


@njit(cache=True, nogil=True, inline="always")
def _tail(family, z, coef):
    """P(X > z), z >= 0, of the unit-scale family (the formulas of entropy_tables._upper_tail)."""
    if family == _LAPLACE:
        return 0.5 * math.exp(-z)
    x = z * _SQRT1_2
    t = 1.0 / (1.0 + 0.5 * x)
    p = coef[9]
    for i in range(8, -1, -1):
        p = p * t + coef[i]
    return 0.5 * (t * math.exp(-x * x + p))


@njit(cache=True, nogil=True)
def _fit_costs_kernel(keys, family, q, mstep, clo, chi, esc, coef):
    k = keys.shape[0]
    core = chi - clo + 1
    n = core + 2 if esc else core
    out = np.empty((k, n))
    z = np.empty(core + 1)
    tz = np.empty(core + 1)
    w = np.empty(n)
    for r in range(k):
        sigma = math.exp(keys[r, 0] / q * _LN2)
        mu = keys[r, 1] / mstep if mstep else 0.0
        for i in range(core + 1):
            z[i] = ((clo + i - 0.5) - mu) / sigma
            tz[i] = _tail(family, abs(z[i]), coef)
        tot = 0.0
        for i in range(core):
            a, b = z[i], z[i + 1]
            if a >= 0:
                m = tz[i] - tz[i + 1]
            elif b <= 0:
                m = tz[i + 1] - tz[i]
            else:
                m = 1.0 - tz[i] - tz[i + 1]
            w[i] = max(m, 0.0)
            tot += w[i]
        if esc:
            w[core] = tz[0] if z[0] <= 0 else 1.0 - tz[0]
            w[core + 1] = tz[core] if z[core] >= 0 else 1.0 - tz[core]
            tot += w[core] + w[core + 1]
        psum = 0.0
        for i in range(n):
            p = w[i] / tot if tot > 0 else 1.0 / n
            w[i] = max(p, _FLOOR)
            psum += w[i]
        for i in range(n):
            out[r, i] = -math.log2(w[i] / psum)
    return out


def fit_costs(family: str, q: int, mstep: int, clo: int, chi: int, esc: bool, keys: np.ndarray) -> np.ndarray:
    """(K, n) code lengths in bits of the tables for (scale index, mean index) keys (K, 2)."""
    keys = np.ascontiguousarray(np.asarray(keys, dtype=np.int64).reshape(-1, 2))
    fam = {"gauss": _GAUSS, "laplace": _LAPLACE}[family]
    return _fit_costs_kernel(keys, fam, int(q), int(mstep), int(clo), int(chi), bool(esc), _ERFC_COEF)


def fit_costs_ref(family: str, q: int, mstep: int, clo: int, chi: int, esc: bool, keys: np.ndarray) -> np.ndarray:
    """Numpy reference for :func:`fit_costs`: the tables' numpy expression with libm exp."""
    from ..coding.entropy_models import fit_cost_bits
    from ..coding.entropy_tables import Param, param_tables

    return fit_cost_bits(param_tables(Param(family, q, mstep), clo, chi, esc, keys, np.exp))


@njit(cache=True, nogil=True)
def _line_costs_kernel(h, cst, idx):
    lines, n = h.shape
    k = idx.shape[1]
    out = np.zeros((lines, k))
    for r in range(lines):
        for j in range(n):
            c = h[r, j]
            if c != 0:  # line histograms are mostly empty on wide alphabets
                cf = float(c)
                for q in range(k):
                    out[r, q] += cf * cst[idx[r, q], j]
    return out


def line_costs(h: np.ndarray, cst: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(lines, K) bits of each line's histogram ``h`` (lines, n) under the K candidate tables
    ``cst[idx[line]]`` (code lengths, (U, n)); the sum runs over the nonzero counts only."""
    return _line_costs_kernel(np.ascontiguousarray(h), np.ascontiguousarray(cst, dtype=np.float64),
                              np.ascontiguousarray(idx, dtype=np.int64))


def line_costs_ref(h: np.ndarray, cst: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Numpy reference for :func:`line_costs` (the expression ``fit_lines`` used)."""
    return np.einsum("ln,lkn->lk", h.astype(np.float64), cst[idx])


@njit(cache=True, nogil=True)
def _line_moments_kernel(h, values):
    lines, n = h.shape
    mean = np.empty(lines)
    std = np.empty(lines)
    for r in range(lines):
        tot = 0
        num = 0.0
        for j in range(n):
            if h[r, j] != 0:
                tot += h[r, j]
                num += h[r, j] * values[j]
        mu = num / max(tot, 1)
        var = 0.0
        for j in range(n):
            if h[r, j] != 0:
                d = values[j] - mu
                var += h[r, j] * (d * d)
        mean[r] = mu
        std[r] = math.sqrt(var / max(tot, 1))
    return mean, std


def line_moments(h: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each line's histogram ``h`` (lines, n) over ``values``."""
    return _line_moments_kernel(np.ascontiguousarray(h), np.ascontiguousarray(values, dtype=np.float64))


def line_moments_ref(h: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference for :func:`line_moments` (the expression ``fit_lines`` used)."""
    tot = np.maximum(h.sum(axis=1), 1)
    mean = (h * values[None, :]).sum(axis=1) / tot
    var = (h * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / tot
    return mean, np.sqrt(var)
