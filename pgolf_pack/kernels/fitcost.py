"""Code lengths of the parametric tables for the entropy fits, one fused pass per key.

The fits price tens of thousands of (scale index, mean index) keys, each a table over the whole
core alphabet; as numpy expressions that was a dozen temporaries per entry and most of a
wide-alphabet fit. These lengths only steer the fits' choices (libm ``exp``, sequential sums),
so they may differ from the coder's exact tables (``coding.entropy_tables``, whose formulas and
constants they evaluate) in the last ulps.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.typed import Dict

from ..coding.entropy_tables import _ERFC_COEF as _ERFC_LIST
from ..coding.entropy_tables import _LN2_HI, _LN2_LO, _SQRT1_2, ANS_PRECISION, FAMILIES

_GAUSS, _LAPLACE = FAMILIES.index("gauss"), FAMILIES.index("laplace")
_LN2 = _LN2_HI + _LN2_LO  # as entropy_tables.scale_of adds them
_FLOOR = 2.0**-ANS_PRECISION
_ERFC_COEF = np.array(_ERFC_LIST)
# A table key (s, m) as one int64: m above, s + 2**20 below. Scale indices stay within 2**20 (the
# grid spans 2**-6 .. 2**24 at Q <= 16); means within 2**41 (a 33-bit residual range, finest grid).
_S_BITS = 21


def check_keys(s: np.ndarray, m: np.ndarray) -> None:
    """Refuse (scale, mean) indices that one int64 key code cannot hold."""
    s, m = np.asarray(s), np.asarray(m)
    if (s.size and np.abs(s).max() >= 1 << (_S_BITS - 1)) or (m.size and np.abs(m).max() >= 1 << 41):
        raise ValueError("entropy table key out of range")


def key_codes(keys: np.ndarray) -> np.ndarray:
    """One int64 per (scale, mean) key (K, 2), as the line-fit kernel codes them."""
    check_keys(keys[:, 0], keys[:, 1])
    return (keys[:, 1] << _S_BITS) + (keys[:, 0] + (1 << (_S_BITS - 1)))


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


@njit(cache=True, nogil=True, inline="always")
def _cost_row(out, s, m, family, q, mstep, clo, chi, esc, coef, z, tz, w):
    """Code lengths of the table of key (s, m) into ``out``; z, tz, w are scratch buffers."""
    core = chi - clo + 1
    n = core + 2 if esc else core
    sigma = math.exp(s / q * _LN2)
    mu = m / mstep if mstep else 0.0
    for i in range(core + 1):
        z[i] = ((clo + i - 0.5) - mu) / sigma
        tz[i] = _tail(family, abs(z[i]), coef)
    tot = 0.0
    for i in range(core):
        a, b = z[i], z[i + 1]
        if a >= 0:
            x = tz[i] - tz[i + 1]
        elif b <= 0:
            x = tz[i + 1] - tz[i]
        else:
            x = 1.0 - tz[i] - tz[i + 1]
        w[i] = max(x, 0.0)
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
        out[i] = -math.log2(w[i] / psum)


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
        _cost_row(out[r], keys[r, 0], keys[r, 1], family, q, mstep, clo, chi, esc, coef, z, tz, w)
    return out


def fit_costs(family: str, q: int, mstep: int, clo: int, chi: int, esc: bool, keys: np.ndarray) -> np.ndarray:
    """(K, n) code lengths in bits of the tables for (scale index, mean index) keys (K, 2)."""
    keys = np.ascontiguousarray(np.asarray(keys, dtype=np.int64).reshape(-1, 2))
    return _fit_costs_kernel(keys, FAMILIES.index(family), int(q), int(mstep), int(clo), int(chi), bool(esc),
                             _ERFC_COEF)


def fit_costs_ref(family: str, q: int, mstep: int, clo: int, chi: int, esc: bool, keys: np.ndarray) -> np.ndarray:
    """Numpy reference for :func:`fit_costs`: the tables' numpy expression with libm exp (far in
    a tail a mass is a difference of two tiny tails, which another exp would move wholesale)."""
    from ..coding.entropy_models import fit_cost_bits
    from ..coding.entropy_tables import Param, param_tables

    return fit_cost_bits(param_tables(Param(family, q, mstep), clo, chi, esc, keys, np.exp))


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


@njit(cache=True, nogil=True)
def _fit_lines_kernel(h, s0, m_val, s_min, s_max, window, rounds,
                      family, q, mstep, clo, chi, esc, coef, index, rows, nrows):
    lines, n = h.shape
    core = chi - clo + 1
    z = np.empty(core + 1)
    tz = np.empty(core + 1)
    w = np.empty(n)
    k = 2 * window + 1
    s = s0.copy()
    cost = np.zeros((lines, k))
    best = np.zeros(lines)
    moved = np.ones(lines, np.bool_)
    for _ in range(rounds):
        for r in range(lines):
            if not moved[r]:
                continue  # same candidates as last round: same costs
            for j in range(k):
                sk = min(max(s[r] + j - window, s_min), s_max)
                key = (m_val[r] << _S_BITS) + (sk + (1 << (_S_BITS - 1)))
                at = index[key] if key in index else -1
                if at < 0:
                    if nrows == rows.shape[0]:
                        grown = np.empty((2 * rows.shape[0] + 16, n))
                        grown[:nrows] = rows[:nrows]
                        rows = grown
                    _cost_row(rows[nrows], sk, m_val[r], family, q, mstep, clo, chi, esc, coef, z, tz, w)
                    at = nrows
                    index[key] = at
                    nrows += 1
                acc = 0.0
                for b in range(n):
                    c = h[r, b]
                    if c != 0:  # line histograms are mostly empty on wide alphabets
                        acc += float(c) * rows[at, b]
                cost[r, j] = acc
        same = True
        for r in range(lines):
            jb = 0
            for j in range(1, k):
                if cost[r, j] < cost[r, jb]:
                    jb = j
            sn = min(max(s[r] + jb - window, s_min), s_max)
            best[r] = cost[r, jb]
            moved[r] = sn != s[r]
            if moved[r]:
                same = False
            s[r] = sn
        if same:
            break
    return s, best, rows, nrows


class LineFit:
    """Scale-index fits of many lines' histograms under one table family, the tables' code
    lengths computed once per (scale index, mean index) key for all the lines it serves (a
    hash map holds the keys met so far: only the few around each line's start are)."""

    def __init__(self, family: str, q: int, mstep: int, clo: int, chi: int, esc: bool):
        self.args = (FAMILIES.index(family), int(q), int(mstep), int(clo), int(chi), bool(esc), _ERFC_COEF)
        self.index = Dict.empty(key_type=types.int64, value_type=types.int64)
        n = chi - clo + 1 + (2 if esc else 0)
        self.rows = np.empty((64, n))
        self.nrows = 0

    def fit(self, h: np.ndarray, s0: np.ndarray, m: np.ndarray, s_min: int, s_max: int, window: int,
            rounds: int) -> tuple[np.ndarray, np.ndarray]:
        """Per line of ``h`` (lines, n): the scale index the coordinate search ends at, starting
        from ``s0`` with mean indices ``m``, and the line's bits there. Each round moves every
        line to the cheapest of its index +- window (the first on a tie); the search stops when
        no line moves."""
        m = np.asarray(m, np.int64)
        check_keys(np.array([s_min, s_max]), m)
        s, best, self.rows, self.nrows = _fit_lines_kernel(
            np.ascontiguousarray(h), np.asarray(s0, np.int64), m, int(s_min), int(s_max),
            int(window), int(rounds), *self.args, self.index, self.rows, self.nrows)
        return s, best


def line_fit_ref(h, s0, m, s_min, s_max, window, rounds, family, q, mstep, clo, chi, esc):
    """Numpy reference for :meth:`LineFit.fit` (the loop ``fit_lines`` ran before the kernel).

    The tables' code lengths come from :func:`fit_costs` (tested against numpy on its own): on a
    saturated grid candidates' tables differ in the last ulps only, and must compare the same.
    """
    s = np.asarray(s0, np.int64).copy()
    m = np.asarray(m, np.int64)
    steps = np.arange(-window, window + 1)[None, :]
    best = np.zeros(len(s))
    if len(s) == 0:
        return s, best
    for _ in range(rounds):
        cand = np.clip(s[:, None] + steps, s_min, s_max)
        keys = np.stack([cand, np.broadcast_to(m[:, None], cand.shape)], -1).reshape(-1, 2)
        cst = fit_costs(family, q, mstep, clo, chi, esc, keys).reshape(cand.shape + (-1,))
        # Summed left to right (cumsum adds sequentially), as the kernel does: near-saturated
        # tables tie candidates to the last ulps, where another order would pick another one.
        terms = h.astype(np.float64)[:, None, :] * cst
        cost = np.cumsum(terms, axis=-1)[..., -1] if terms.shape[-1] else np.zeros(cand.shape)
        j = cost.argmin(axis=1)
        s_new = cand[np.arange(len(s)), j]
        best = cost[np.arange(len(s)), j]
        if np.array_equal(s_new, s):
            break
        s = s_new
    return s, best
