"""Deterministic probability tables of the entropy codec: what the decoder computes from stored integers.

Every probability the coder sees is a function of stored integers only (a scale index, a mean
index, quantized counts), evaluated with IEEE-exact numpy operations (+, -, *, /, floor, ldexp).
``np.exp``/``erfc`` are avoided on the decode path because their last-ulp results differ between
libm builds and SIMD paths, and one flipped ulp can change a fixed-point frequency and break decode.

Scale grid: class ``s`` has scale ``2**(s/Q)``; the mean grid is ``m / M`` symbols.

Decoder side: plain numpy, importing nothing from the encoder's fitting code
(``entropy_models``), so a standalone decoder can be cut along this seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FAMILIES = ("gauss", "laplace")
# constriction's default ANS precision: no symbol can get less than 2**-24.
ANS_PRECISION = 24
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP_COEF = [1.0 / math.factorial(i) for i in range(14)]
_SQRT1_2 = 0.70710678118654752440
# Numerical Recipes' Chebyshev fit of erfc (fractional error < 1.2e-7); being a fixed sequence of
# basic operations it evaluates identically everywhere.
_ERFC_COEF = [
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
]


def det_exp(x: np.ndarray) -> np.ndarray:
    """exp(x) from basic IEEE operations only (bit-identical on every platform)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -740.0, 700.0)
    k = np.floor(x * _INV_LN2 + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = np.full_like(r, _EXP_COEF[13])
    for c in _EXP_COEF[12::-1]:
        p = p * r + c
    return np.ldexp(p, k.astype(np.int64))


def det_erfc(z: np.ndarray, exp=det_exp) -> np.ndarray:
    """erfc(z) for z >= 0, deterministic (fractional error < 1.2e-7) with the default ``exp``."""
    z = np.asarray(z, dtype=np.float64)
    t = 1.0 / (1.0 + 0.5 * z)
    p = np.full_like(t, _ERFC_COEF[9])
    for c in _ERFC_COEF[8::-1]:
        p = p * t + c
    return t * exp(-z * z + p)


def _upper_tail(family: str, z: np.ndarray, exp=det_exp) -> np.ndarray:
    """P(X > z) for z >= 0 of the unit-scale family."""
    if family == "gauss":
        return 0.5 * det_erfc(z * _SQRT1_2, exp)
    if family == "laplace":
        return 0.5 * exp(-z)
    raise ValueError(f"unknown family {family!r}")


def scale_of(s: np.ndarray, q: int, exp=det_exp) -> np.ndarray:
    """Scale 2**(s/q) of integer scale indices, deterministic with the default ``exp``."""
    return exp(np.asarray(s, dtype=np.float64) / q * (_LN2_HI + _LN2_LO))


def family_tables(family: str, sigma: np.ndarray, mu: np.ndarray, clo: int, chi: int, esc: bool,
                  exp=det_exp) -> np.ndarray:
    """Probabilities (K, n) of the discretized family on core values clo..chi (+ 2 escape tails).

    Column i < chi-clo+1 is the mass of [clo+i-0.5, clo+i+0.5); with ``esc`` the last two columns
    hold the mass below and above the core, which the escape symbols carry. The decoder's tables
    use the default ``exp`` (:func:`det_exp`, the same bits everywhere); the encoder's fits may
    pass ``np.exp``, whose last-ulp differences only move a cost estimate.
    """
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1, 1)
    mu = np.asarray(mu, dtype=np.float64).reshape(-1, 1)
    edges = np.arange(clo, chi + 2, dtype=np.float64) - 0.5
    z = (edges[None, :] - mu) / sigma
    # Masses from whichever tail is small keep full relative precision far from the mean.
    tz = _upper_tail(family, np.abs(z), exp)
    a, b = z[:, :-1], z[:, 1:]
    ta, tb = tz[:, :-1], tz[:, 1:]
    mass = np.where(a >= 0, ta - tb, np.where(b <= 0, tb - ta, 1.0 - ta - tb))
    mass = np.maximum(mass, 0.0)
    if esc:
        below = np.where(z[:, :1] <= 0, tz[:, :1], 1.0 - tz[:, :1])
        above = np.where(z[:, -1:] >= 0, tz[:, -1:], 1.0 - tz[:, -1:])
        mass = np.concatenate([mass, below, above], axis=1)
    return mass


def _exact_row_sums(w: np.ndarray) -> np.ndarray:
    # numpy's pairwise/SIMD summation order differs between builds; fsum is exactly rounded,
    # so the normalized probabilities (and the decoder's fixed-point tables) match everywhere.
    return np.array([[math.fsum(row)] for row in w.tolist()], dtype=np.float64).reshape(-1, 1)


def effective_probs(weights: np.ndarray) -> np.ndarray:
    """The coder's view of a (K, n) weight table: normalized, every symbol at least 2**-24."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    tot = _exact_row_sums(w)
    p = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 1.0 / w.shape[1])
    p = np.maximum(p, 2.0**-ANS_PRECISION)
    return p / _exact_row_sums(p)


# ---------------------------------------------------------------------------------------------
# Parametric tables: per-axis scale (and optional mean) indices


@dataclass(frozen=True)
class Param:
    """Shape family, scale steps per octave Q and mean steps per symbol M (0 = no mean)."""

    family: str = "gauss"
    q: int = 8
    m: int = 0


def param_tables(param: Param, clo: int, chi: int, esc: bool, keys: np.ndarray, exp=det_exp) -> np.ndarray:
    """(K, n) weights for (scale index, mean index) keys (K, 2). Every row depends on its own key
    only (elementwise IEEE operations), so tables computed in any batches are bit-identical."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    sig = scale_of(keys[:, 0], param.q, exp)
    mu = keys[:, 1] / param.m if param.m else np.zeros(len(keys))
    return family_tables(param.family, sig, mu, clo, chi, esc, exp)


class TableCache:
    """Deterministic tables keyed by (scale index, mean index) for one core/escape/param setting."""

    def __init__(self, param: Param, clo: int, chi: int, esc: bool):
        self.param, self.clo, self.chi, self.esc = param, clo, chi, esc
        self._w: dict[tuple[int, int], np.ndarray] = {}

    def weights(self, keys: np.ndarray) -> np.ndarray:
        """(K, n) tables for an int array of (s, m) keys (K, 2)."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        missing = [tuple(k) for k in pair_codes(keys)[0].tolist() if tuple(k) not in self._w]
        if missing:
            tabs = param_tables(self.param, self.clo, self.chi, self.esc, np.array(missing, dtype=np.int64))
            for k, t in zip(missing, tabs):
                self._w[k] = t
        return np.stack([self._w[tuple(k)] for k in keys.tolist()])


def dense_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(codes, return_inverse=True)`` for integer codes, by lookup table when compact."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size == 0:
        return codes.copy(), codes.copy()
    lo, hi = int(codes.min()), int(codes.max())
    if hi - lo > 4 * codes.size + (1 << 16):
        uniq, inv = np.unique(codes, return_inverse=True)
        return uniq, inv.reshape(codes.shape)
    present = np.zeros(hi - lo + 1, dtype=bool)
    present[codes - lo] = True
    uniq = np.flatnonzero(present) + lo
    lut = np.cumsum(present) - 1
    return uniq, lut[codes - lo]


def pair_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique (s, m) rows in lexicographic order and the inverse index, without a row sort."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    if len(keys) == 0:
        return keys.copy(), np.zeros(0, np.int64)
    m0 = int(keys[:, 1].min())
    span = int(keys[:, 1].max()) - m0 + 1
    uniq, inv = dense_codes((keys[:, 0] - int(keys[:, 0].min())) * span + (keys[:, 1] - m0))
    s = uniq // span + int(keys[:, 0].min())
    return np.stack([s, uniq % span + m0], axis=1), inv


# ---------------------------------------------------------------------------------------------
# Bit-level side information (reading; the writer lives with the encoder)


class BitReader:
    def __init__(self, data: bytes, error: type[Exception]) -> None:
        self._s = bin(int.from_bytes(data, "big"))[2:].zfill(8 * len(data)) if data else ""
        self._pos = 0
        self._error = error

    def bits(self, n: int) -> int:
        if n == 0:
            return 0
        end = self._pos + n
        if end > len(self._s):
            raise self._error("side information is truncated")
        v = int(self._s[self._pos:end], 2)
        self._pos = end
        return v

    def eg(self, k: int = 0) -> int:
        i = self._s.find("1", self._pos)
        if i < 0 or i - self._pos > 64:
            raise self._error("side information is corrupt (bad Exp-Golomb code)")
        ln = i - self._pos
        self._pos = i
        return self.bits(ln + k + 1) - (1 << k)

    def se(self) -> int:
        u = self.eg()
        return u // 2 if u % 2 == 0 else -(u + 1) // 2


def read_table(br: BitReader, n: int, max_value: int = 1 << 40) -> np.ndarray:
    k = br.bits(5)
    out = np.zeros(n, dtype=np.int64)
    i = 0
    while i < n:
        v = br.eg(k)
        if v > max_value:
            raise br._error("side information is corrupt (count out of range)")
        if v == 0:
            r = br.eg() + 1
            if i + r > n:
                raise br._error("side information is corrupt (table overruns its length)")
            i += r
        else:
            out[i] = v
            i += 1
    return out


# ---------------------------------------------------------------------------------------------
# Row prediction: each row may be predicted from one earlier row or from the running mean of an
# earlier group of rows, scaled by a coefficient k / PRED_DEN. Rows that look alike (e.g. the
# embedding rows of tokens never seen in training) then cost only their residual.

PRED_DEN = 8
PRED_KMAX = 16  # coefficients in [-2, 2]
MODE_NONE, MODE_GROUP, MODE_ROW = 0, 1, 2


@dataclass
class RowPred:
    """Per-row prediction choices of one tensor (lengths: mode R; gidx, roff, coef per use)."""

    mode: np.ndarray  # 0 none, 1 mean of an active group, 2 one earlier row
    gidx: np.ndarray  # mode 1: index into the groups that have >= 2 rows, in order of reaching 2
    roff: np.ndarray  # mode 2: r - j - 1 for reference row j
    coef: np.ndarray  # modes 1, 2: k in [-PRED_KMAX, PRED_KMAX] \ {0}


def _rounded_pred(k: int, s: np.ndarray, n: int) -> np.ndarray:
    """round-half-up(k * s / (PRED_DEN * n)) in exact integer arithmetic."""
    d = 2 * PRED_DEN * n
    return (2 * k * s + PRED_DEN * n) // d


def run_row_prediction(src: np.ndarray, pred: RowPred, decode: bool) -> np.ndarray:
    """Residuals of x (decode=False) or x from residuals (decode=True); both walk rows in order.

    Raises ValueError on inconsistent choices (a corrupt buffer on the decode side).
    """
    rows, cols = src.shape
    out = np.empty_like(src)
    xs = src if not decode else out
    sums: list[np.ndarray] = []
    counts: list[int] = []
    group_of = np.empty(rows, dtype=np.int64)
    active: list[int] = []
    gi = ri = ci = 0
    for r in range(rows):
        m = int(pred.mode[r])
        if m == MODE_NONE:
            out[r] = src[r]
            g = len(sums)
            sums.append(np.zeros(cols, np.int64))
            counts.append(0)
        else:
            k = int(pred.coef[ci])
            ci += 1
            if m == MODE_GROUP:
                g = active[int(pred.gidx[gi])]
                gi += 1
                p = _rounded_pred(k, sums[g], counts[g])
            elif m == MODE_ROW:
                j = r - 1 - int(pred.roff[ri])
                ri += 1
                if j < 0:
                    raise ValueError("row reference before the first row")
                g = int(group_of[j])
                p = _rounded_pred(k, xs[j], 1)
            else:
                raise ValueError(f"unknown row prediction mode {m}")
            out[r] = src[r] + p if decode else src[r] - p
        group_of[r] = g
        sums[g] += xs[r]
        counts[g] += 1
        if counts[g] == 2:
            active.append(g)
    return out
