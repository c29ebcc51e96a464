"""Probability models for the entropy codec: deterministic tables and the fits that choose them.

Every probability the coder sees is a function of stored integers only (a scale index, a mean
index, quantized counts), evaluated with IEEE-exact numpy operations (+, -, *, /, floor, ldexp).
``np.exp``/``erfc`` are avoided on the decode path because their last-ulp results differ between
libm builds and SIMD paths, and one flipped ulp can change a fixed-point frequency and break decode.

Scale grid: class ``s`` has scale ``2**(s/Q)``; the mean grid is ``m / M`` symbols.
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


def det_erfc(z: np.ndarray) -> np.ndarray:
    """erfc(z) for z >= 0, deterministic (fractional error < 1.2e-7)."""
    z = np.asarray(z, dtype=np.float64)
    t = 1.0 / (1.0 + 0.5 * z)
    p = np.full_like(t, _ERFC_COEF[9])
    for c in _ERFC_COEF[8::-1]:
        p = p * t + c
    return t * det_exp(-z * z + p)


def _upper_tail(family: str, z: np.ndarray) -> np.ndarray:
    """P(X > z) for z >= 0 of the unit-scale family."""
    if family == "gauss":
        return 0.5 * det_erfc(z * _SQRT1_2)
    if family == "laplace":
        return 0.5 * det_exp(-z)
    raise ValueError(f"unknown family {family!r}")


def scale_of(s: np.ndarray, q: int) -> np.ndarray:
    """Scale 2**(s/q) of integer scale indices, deterministic."""
    return det_exp(np.asarray(s, dtype=np.float64) / q * (_LN2_HI + _LN2_LO))


def family_tables(family: str, sigma: np.ndarray, mu: np.ndarray, clo: int, chi: int, esc: bool) -> np.ndarray:
    """Probabilities (K, n) of the discretized family on core values clo..chi (+ 2 escape tails).

    Column i < chi-clo+1 is the mass of [clo+i-0.5, clo+i+0.5); with ``esc`` the last two columns
    hold the mass below and above the core, which the escape symbols carry.
    """
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1, 1)
    mu = np.asarray(mu, dtype=np.float64).reshape(-1, 1)
    edges = np.arange(clo, chi + 2, dtype=np.float64) - 0.5
    z = (edges[None, :] - mu) / sigma
    # Masses from whichever tail is small keep full relative precision far from the mean.
    tz = _upper_tail(family, np.abs(z))
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


def cost_bits(weights: np.ndarray) -> np.ndarray:
    """-log2 of the effective probabilities (encoder-side only; may use libm)."""
    return -np.log2(effective_probs(weights))


# ---------------------------------------------------------------------------------------------
# Quantized count tables (hist model, side-index histograms)


def quantize_counts(counts: np.ndarray, bits: int) -> np.ndarray:
    """Scale counts to about 2**bits, keeping every present symbol at >= 1."""
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if n == 0:
        return c.copy()
    if n <= (1 << bits):
        return c.copy()
    q = (c * (1 << bits) + n // 2) // n
    return np.where(c > 0, np.maximum(q, 1), 0)


def hist_cost_bits(counts: np.ndarray, table: np.ndarray) -> float:
    """Bits to code data with histogram ``counts`` under the table ``table``."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() == 0:
        return 0.0
    return float((c * cost_bits(table)[0]).sum())


# ---------------------------------------------------------------------------------------------
# Parametric fits: per-axis scale (and optional mean) indices


@dataclass(frozen=True)
class Param:
    """Shape family, scale steps per octave Q and mean steps per symbol M (0 = no mean)."""

    family: str = "gauss"
    q: int = 8
    m: int = 0


def axis_hists(ys: list[np.ndarray], n: int, axis: int) -> list[np.ndarray]:
    """Per-column (axis=1) or per-row (axis=0) histograms (lines, n) of alphabet indices."""
    out = []
    for y in ys:
        yy = y if axis == 1 else y.T
        r, c = yy.shape
        idx = yy.astype(np.int64) + (np.arange(c, dtype=np.int64) * n)[None, :]
        out.append(np.bincount(idx.ravel(), minlength=c * n).reshape(c, n))
    return out


def _moments(h: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tot = np.maximum(h.sum(axis=1), 1)
    mean = (h * values[None, :]).sum(axis=1) / tot
    var = (h * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / tot
    return mean, np.sqrt(var)


class TableCache:
    """Deterministic tables keyed by (scale index, mean index) for one core/escape/param setting."""

    def __init__(self, param: Param, clo: int, chi: int, esc: bool):
        self.param, self.clo, self.chi, self.esc = param, clo, chi, esc
        self._w: dict[tuple[int, int], np.ndarray] = {}
        self._c: dict[tuple[int, int], np.ndarray] = {}

    def weights(self, keys: np.ndarray) -> np.ndarray:
        """(K, n) tables for an int array of (s, m) keys (K, 2)."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        missing = [tuple(k) for k in pair_codes(keys)[0].tolist() if tuple(k) not in self._w]
        if missing:
            mk = np.array(missing, dtype=np.int64)
            sig = scale_of(mk[:, 0], self.param.q)
            mu = mk[:, 1] / self.param.m if self.param.m else np.zeros(len(mk))
            tabs = family_tables(self.param.family, sig, mu, self.clo, self.chi, self.esc)
            for k, t in zip(missing, tabs):
                self._w[k] = t
        return np.stack([self._w[tuple(k)] for k in keys.tolist()])

    def costs(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        missing = [tuple(k) for k in pair_codes(keys)[0].tolist() if tuple(k) not in self._c]
        if missing:
            c = cost_bits(self.weights(np.array(missing)))
            for k, row in zip(missing, c):
                self._c[k] = row
        return np.stack([self._c[tuple(k)] for k in keys.tolist()])


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


def initial_scale_index(h: np.ndarray, values: np.ndarray, q: int, s_min: int, s_max: int) -> tuple[np.ndarray, np.ndarray]:
    mean, std = _moments(h, values)
    s0 = np.round(q * np.log2(np.maximum(std, 2.0**-6))).astype(np.int64)
    return np.clip(s0, s_min, s_max), mean


def fit_lines(
    hists: list[list[np.ndarray]],
    cache: TableCache,
    values: np.ndarray,
    s_range: tuple[int, int],
    offsets: list[np.ndarray] | None = None,
    means: list[np.ndarray] | None = None,
    init: list[np.ndarray] | None = None,
    window: int = 2,
    rounds: int = 3,
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """ML scale index per line (row or column) of each tensor, plus its mean index.

    ``hists[t]`` lists (lines, n) histograms, one per group of the other axis; ``offsets[t][g]``
    is that group's (scale, mean) index offset, so a symbol's table key is
    (s_line + off_s, m_line + off_m). Mean indices come from ``means`` or, when the param has a
    mean grid, from the line's sample mean. Returns scale indices, mean indices, total bits.
    """
    p = cache.param
    s_min, s_max = s_range
    s_out, m_out, total = [], [], 0.0
    for t, groups in enumerate(hists):
        offs = np.asarray(offsets[t], np.int64).reshape(-1, 2) if offsets is not None else np.zeros((1, 2), np.int64)
        hsum = np.sum(groups, axis=0) if len(groups) else np.zeros((0, len(values)), np.int64)
        nlines = hsum.shape[0]
        if nlines == 0:
            s_out.append(np.zeros(0, np.int64))
            m_out.append(np.zeros(0, np.int64))
            continue
        s, mean = initial_scale_index(hsum, values, p.q, s_min, s_max)
        if init is not None:
            s = np.asarray(init[t], dtype=np.int64).copy()
        elif offsets is not None:
            s = np.clip(s - int(np.round(np.median(offs[:, 0]))), s_min, s_max)
        if means is not None:
            m = np.asarray(means[t], np.int64)
        elif p.m:
            m = np.round(mean * p.m).astype(np.int64)
        else:
            m = np.zeros(nlines, np.int64)
        best_cost = None
        for _ in range(rounds):
            cand = np.clip(s[:, None] + np.arange(-window, window + 1)[None, :], s_min, s_max)
            cost = np.zeros(cand.shape)
            for g, (os_, om) in zip(groups, offs.tolist()):
                if not g.any():
                    continue
                keys = np.stack([cand + os_, np.broadcast_to(m[:, None] + om, cand.shape)], -1)
                uniq, inv = pair_codes(keys)
                cst = cache.costs(uniq)
                cost += np.einsum("ln,lkn->lk", g.astype(np.float64), cst[inv.reshape(cand.shape)])
            j = cost.argmin(axis=1)
            s_new = cand[np.arange(nlines), j]
            best_cost = cost[np.arange(nlines), j]
            if np.array_equal(s_new, s):
                break
            s = s_new
        s_out.append(s)
        m_out.append(m)
        total += float(best_cost.sum())
    return s_out, m_out, total


# ---------------------------------------------------------------------------------------------
# Bit-level side information: Exp-Golomb codes and count tables


class BitWriter:
    """MSB-first bit string for the small side-information header."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def bits(self, value: int, n: int) -> None:
        if n:
            if not 0 <= value < (1 << n):
                raise ValueError(f"{value} does not fit in {n} bits")
            self._parts.append(format(value, f"0{n}b"))

    def eg(self, v: int, k: int = 0) -> None:
        """Exp-Golomb code of order k for v >= 0."""
        w = v + (1 << k)
        ln = w.bit_length() - 1 - k
        self._parts.append("0" * ln + format(w, f"0{ln + k + 1}b"))

    def se(self, v: int) -> None:
        self.eg(2 * v if v >= 0 else -2 * v - 1)

    def getvalue(self) -> bytes:
        s = "".join(self._parts)
        if not s:
            return b""
        s += "0" * (-len(s) % 8)
        return int(s, 2).to_bytes(len(s) // 8, "big")


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


def _eg_len(v: np.ndarray, k: int) -> np.ndarray:
    w = np.asarray(v, dtype=np.int64) + (1 << k)
    top = np.floor(np.log2(w)).astype(np.int64)
    # Float log2 can be off by one next to a power of two; settle it on the integers.
    top = np.where((w >> top) == 0, top - 1, top)
    top = np.where((w >> (top + 1)) > 0, top + 1, top)
    return 2 * (top - k) + k + 1


def _table_tokens(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero entries and zero runs: (values, runs) where run > 0 marks a zero run."""
    t = np.asarray(t, dtype=np.int64)
    vals, runs = [], []
    i, n = 0, len(t)
    nz = np.flatnonzero(t)
    j = 0
    while i < n:
        if t[i]:
            vals.append(int(t[i]))
            runs.append(0)
            i += 1
        else:
            while j < len(nz) and nz[j] < i:
                j += 1
            end = int(nz[j]) if j < len(nz) else n
            vals.append(0)
            runs.append(end - i)
            i = end
    return np.array(vals, dtype=np.int64), np.array(runs, dtype=np.int64)


def table_bits(t: np.ndarray) -> tuple[int, int]:
    """(bits, order k) of the cheapest Exp-Golomb coding of a count table (5 bits for k)."""
    vals, runs = _table_tokens(t)
    if len(vals) == 0:
        return 5, 0
    run_bits = int(_eg_len(runs[runs > 0] - 1, 0).sum())
    best = None
    # The total Exp-Golomb length is unimodal in k, so stop once it starts growing.
    for k in range(0, 25):
        b = int(_eg_len(vals, k).sum()) + run_bits + 5
        if best is None or b < best[0]:
            best = (b, k)
        elif b > best[0]:
            break
    return best


def write_table(bw: BitWriter, t: np.ndarray) -> None:
    _, k = table_bits(t)
    bw.bits(k, 5)
    vals, runs = _table_tokens(t)
    for v, r in zip(vals.tolist(), runs.tolist()):
        bw.eg(v, k)
        if v == 0:
            bw.eg(r - 1)


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


def choose_table(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Quantized table minimizing (data bits under it + its own bits); returns (table, total bits)."""
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    best = None
    top = max(2, int(n).bit_length())
    for b in range(2, top + 1):
        q = quantize_counts(c, b)
        bits = hist_cost_bits(c, q) + table_bits(q)[0]
        if best is None or bits < best[1] - 1e-9:
            best = (q, bits)
        if n <= (1 << b):
            break
    return best


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


def fit_row_prediction(x: np.ndarray, block: int = 256) -> RowPred:
    """Greedy choice per row of the predictor that saves the most estimated bits (or none).

    Savings are estimated from residual energy (Gaussian rate 0.5*log2 of the energy ratio per
    symbol) minus the side-information bits of the choice.
    """
    rows, cols = x.shape
    mode = np.zeros(rows, np.int64)
    gidx, roff, coef = [], [], []
    if rows < 2 or cols == 0:
        return RowPred(mode, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    xf = x.astype(np.float32)
    nrm = (x.astype(np.float64) ** 2).sum(axis=1)
    floor = 0.1 * cols
    group_of = np.zeros(rows, np.int64)
    counts = np.zeros(rows, np.int64)
    ss = np.zeros(rows)  # squared norm of each group's sum
    active: list[int] = []
    ngroups = 0
    for b0 in range(0, rows, block):
        b1 = min(rows, b0 + block)
        gram = (xf[:b1] @ xf[b0:b1].T).astype(np.float64)  # (b1, block)
        for r in range(b0, b1):
            col = gram[:, r - b0]
            best_gain, best = 0.0, None
            e0 = nrm[r] + floor
            dots = np.bincount(group_of[:r], weights=col[:r], minlength=ngroups + 1)
            if r > 0:
                px = col[:r]
                pp = nrm[:r]
                cand = [(px, pp, MODE_ROW, np.log2(r) + 1.5)]
                if active:
                    act = np.array(active)
                    n = counts[act].astype(np.float64)
                    cand.append((dots[act] / n, ss[act] / n**2, MODE_GROUP, np.log2(len(active)) + 1.5))
                for cpx, cpp, kind, side in cand:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        k = np.clip(np.rint(PRED_DEN * cpx / np.where(cpp > 0, cpp, 1)), -PRED_KMAX, PRED_KMAX)
                    c = k / PRED_DEN
                    e = np.maximum(nrm[r] - 2 * c * cpx + c * c * cpp, 0.0) + cols / 12.0 * (k != 0)
                    gain = 0.5 * cols * np.log2(e0 / np.maximum(e + floor, 1e-9)) - side - 4.0
                    gain = np.where(k != 0, gain, -np.inf)
                    i = int(np.argmax(gain))
                    if gain[i] > best_gain:
                        best_gain, best = float(gain[i]), (kind, i, int(k[i]))
            if best is None:
                g = ngroups
                ngroups += 1
            else:
                kind, i, k = best
                mode[r] = kind
                coef.append(k)
                if kind == MODE_ROW:
                    roff.append(r - 1 - i)
                    g = int(group_of[i])
                else:
                    gidx.append(i)
                    g = active[i]
            # Group bookkeeping mirrors run_row_prediction: a row joins its reference's group.
            ss[g] += 2.0 * float(dots[g]) + nrm[r]
            group_of[r] = g
            counts[g] += 1
            if counts[g] == 2:
                active.append(g)
    return RowPred(mode, np.array(gidx, np.int64), np.array(roff, np.int64), np.array(coef, np.int64))



def single_ref_share(x: np.ndarray, block: int = 512) -> float:
    """Share of rows that one earlier row would predict profitably (cheap pre-check for ``ref``).

    Same estimate as :func:`fit_row_prediction` for its single-row candidates, from one Gram
    matrix, ignoring group means and coefficient quantization.
    """
    rows, cols = x.shape
    if rows < 2 or cols == 0:
        return 0.0
    xf = x.astype(np.float32)
    nrm = (x.astype(np.float64) ** 2).sum(axis=1)
    floor = 0.1 * cols
    hits = 0
    for b0 in range(0, rows, block):
        b1 = min(rows, b0 + block)
        gram = (xf[:b1] @ xf[b0:b1].T).astype(np.float64)
        mask = np.arange(b1)[:, None] < np.arange(b0, b1)[None, :]  # earlier rows only
        rho2 = np.where(mask, gram**2 / np.maximum(np.outer(nrm[:b1], nrm[b0:b1]), 1e-9), 0.0)
        best = np.clip(rho2.max(axis=0), 0.0, 1.0)  # float32 Gram entries can overshoot slightly
        e = nrm[b0:b1] * (1 - best) + cols / 12.0  # the rounded prediction adds 1/12 per symbol
        gain = 0.5 * cols * np.log2((nrm[b0:b1] + floor) / (e + floor)) - np.log2(np.arange(b0, b1) + 1) - 5.5
        hits += int((gain > 0).sum())
    return hits / rows


def fit_rc_offsets(
    ys: list[np.ndarray],
    u: list[np.ndarray],
    v: list[np.ndarray],
    m: list[np.ndarray],
    cache: TableCache,
    s_range: tuple[int, int],
    rounds: int = 2,
    window: int = 2,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Alternating ML fit of row offsets u and column scales v, key (u_r + v_c, m_c).

    Costs are gathered per symbol from one dense table over the key range, so the work is
    O(symbols x window) per pass whatever the number of distinct keys.
    """
    s_min, s_max = s_range
    u = [np.asarray(a, np.int64).copy() for a in u]
    v = [np.asarray(a, np.int64).copy() for a in v]
    m = [np.asarray(a, np.int64) for a in m]
    if not ys:
        return u, v
    m_lo = min(int(a.min()) for a in m)
    m_n = max(int(a.max()) for a in m) - m_lo + 1
    for _ in range(rounds):
        for axis in (0, 1):  # rows, then columns
            s_lo = max(s_min, min(int(a.min()) for a in u) + min(int(b.min()) for b in v) - window)
            s_hi = min(s_max, max(int(a.max()) for a in u) + max(int(b.max()) for b in v) + window)
            if s_hi < s_lo:
                s_hi = s_lo
            grid = np.stack(np.meshgrid(np.arange(s_lo, s_hi + 1), np.arange(m_lo, m_lo + m_n), indexing="ij"), -1)
            table = cache.costs(grid.reshape(-1, 2))  # ((S * M), n)
            n = table.shape[1]
            flat = table.ravel()
            for t, y in enumerate(ys):
                line = u[t] if axis == 0 else v[t]
                best_c = np.full(len(line), np.inf)
                best_s = line.copy()
                mrow = (m[t] - m_lo)[None, :]
                for d in range(-window, window + 1):
                    cand = line + d
                    s = (cand[:, None] + v[t][None, :]) if axis == 0 else (u[t][:, None] + cand[None, :])
                    ok = (s >= s_lo) & (s <= s_hi)
                    idx = ((np.clip(s, s_lo, s_hi) - s_lo) * m_n + mrow) * n + y
                    c = np.where(ok, flat[idx], 1e9).sum(axis=1 - axis)
                    better = c < best_c
                    best_c = np.where(better, c, best_c)
                    best_s = np.where(better, cand, best_s)
                if axis == 0:
                    u[t] = best_s
                else:
                    v[t] = best_s
    return u, v
