"""Fitting for the entropy codec (encoder only): code lengths, count tables, line and row fits.

The tables these fits choose between are computed by :mod:`.entropy_tables`, exactly as the
decoder computes them; code lengths here may use libm (``log2``) since they only steer choices.
"""

from __future__ import annotations

import numpy as np

from ..kernels.ctxsort import line_hists
from ..kernels.fitcost import LineFit, fit_costs, key_codes, line_moments
from ..kernels.rowcost import best_prior_rho2, offset_pass
from ..kernels.rowpred import choose_row_predictors
from ..kernels.tablebits import table_bits
from .entropy_tables import (  # noqa: F401  (re-exported: the tables are part of this module's API)
    ANS_PRECISION,
    FAMILIES,
    MODE_GROUP,
    MODE_NONE,
    MODE_ROW,
    PRED_DEN,
    PRED_KMAX,
    BitReader,
    Param,
    RowPred,
    TableCache,
    dense_codes,
    det_erfc,
    det_exp,
    effective_probs,
    family_tables,
    pair_codes,
    param_tables,
    read_table,
    run_row_prediction,
    scale_of,
)

def cost_bits(weights: np.ndarray) -> np.ndarray:
    """-log2 of the effective probabilities (encoder-side only; may use libm)."""
    return -np.log2(effective_probs(weights))


def fit_cost_bits(weights: np.ndarray) -> np.ndarray:
    """:func:`cost_bits` with numpy's own row sums instead of exactly rounded ones, for the fits'
    search only: a candidate's cost moves by a few ulps (1e-16 relative), far below any gap the
    search decides on, while fsum over Python lists was the fits' largest cost on wide alphabets.
    The coded bytes, their size estimate and the decoder keep the exact tables."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    tot = w.sum(axis=1, keepdims=True)
    p = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 1.0 / w.shape[1])
    p = np.maximum(p, 2.0**-ANS_PRECISION)
    return -np.log2(p / p.sum(axis=1, keepdims=True))


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


def axis_hists(ys: list[np.ndarray], n: int, axis: int) -> list[np.ndarray]:
    """Per-column (axis=1) or per-row (axis=0) histograms (lines, n) of alphabet indices."""
    return [line_hists(y, n, axis) for y in ys]


class CostCache:
    """The fits' code lengths of the tables for (scale index, mean index) keys under one
    core/escape/param setting (:func:`fit_costs`), each key computed once. It keeps no
    probability tables: the coder's own come from :class:`TableCache`."""

    def __init__(self, param: Param, clo: int, chi: int, esc: bool):
        self.param, self.clo, self.chi, self.esc = param, clo, chi, esc
        # Rows live in one growing array (capacity doubles) so a lookup is one gather; the keys
        # known so far are kept sorted by their pair code, so finding them is one searchsorted.
        self._codes = np.zeros(0, np.int64)
        self._ids = np.zeros(0, np.int64)
        self._rows = np.zeros((0, 0))
        self._n = 0

    def _find(self, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self._codes, code), max(len(self._codes) - 1, 0))
        hit = self._codes[pos] == code if len(self._codes) else np.zeros(len(code), bool)
        return pos, hit

    def costs(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        code = key_codes(keys)
        pos, hit = self._find(code)
        if not hit.all():
            # Rows depend only on their own key, so the batch (and its order) is free to choose.
            new_codes, first = np.unique(code[~hit], return_index=True)
            missing = keys[~hit][first]
            # Fused, in libm's exp rather than the decoder's portable one: only costs are kept
            # from these tables, and building them was most of a wide-alphabet fit.
            p = self.param
            c = fit_costs(p.family, p.q, p.m, self.clo, self.chi, self.esc, missing)
            if self._n + len(missing) > len(self._rows):
                grown = np.zeros((max(2 * len(self._rows), self._n + len(missing), 64), c.shape[1]))
                if self._n:
                    grown[: self._n] = self._rows[: self._n]
                self._rows = grown
            self._rows[self._n: self._n + len(missing)] = c
            codes = np.concatenate([self._codes, new_codes])
            ids = np.concatenate([self._ids, np.arange(self._n, self._n + len(missing))])
            order = np.argsort(codes, kind="stable")
            self._codes, self._ids = codes[order], ids[order]
            self._n += len(missing)
            pos, hit = self._find(code)
        return self._rows[self._ids[pos]]


def initial_scale_index(std: np.ndarray, q: int, s_min: int, s_max: int) -> np.ndarray:
    s0 = np.round(q * np.log2(np.maximum(std, 2.0**-6))).astype(np.int64)
    return np.clip(s0, s_min, s_max)


def fit_lines(
    hists: list[np.ndarray],
    param: Param,
    clo: int,
    chi: int,
    esc: bool,
    values: np.ndarray,
    s_range: tuple[int, int],
    window: int = 2,
    rounds: int = 3,
    moments: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """ML scale index per line (row or column) of each tensor, plus its mean index.

    ``hists[t]`` is tensor t's (lines, n) histograms. A line starts at the scale index of its
    sample spread, its mean index is its sample mean on the param's mean grid (0 without one),
    and a coordinate search (``kernels.fitcost.LineFit``) moves the scale index. ``moments[t]``:
    the (mean, std) of each line, when the caller fits the same histograms under several params.
    Returns scale indices, mean indices, total bits.
    """
    s_min, s_max = s_range
    starts, ms = [], []
    for t, h in enumerate(hists):
        mean, std = moments[t] if moments is not None else line_moments(h, values)
        starts.append(initial_scale_index(std, param.q, s_min, s_max))
        ms.append(np.round(mean * param.m).astype(np.int64) if param.m else np.zeros(h.shape[0], np.int64))
    s_out, total = [], 0.0
    fit = LineFit(param.family, param.q, param.m, clo, chi, esc)
    for h, s0, m in zip(hists, starts, ms):
        if h.shape[0] == 0:
            s_out.append(np.zeros(0, np.int64))
            continue
        s, best = fit.fit(h, s0, m, s_min, s_max, window, rounds)
        s_out.append(s)
        total += float(best.sum())
    return s_out, ms, total


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


def _table_tokens(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero entries and zero runs: (values, runs) where run > 0 marks a zero run."""
    t = np.asarray(t, dtype=np.int64).reshape(-1)
    n = len(t)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    zero = t == 0
    # One token per nonzero entry and one per zero run (at the run's first index), in order.
    pos = np.flatnonzero(~zero | (zero & np.r_[True, ~zero[:-1]]))
    nz = np.flatnonzero(~zero)
    if nz.size:
        nxt = np.searchsorted(nz, pos)
        end = np.where(nxt < nz.size, nz[np.minimum(nxt, nz.size - 1)], n)
    else:
        end = np.full(pos.shape, n)
    zp = zero[pos]
    return np.where(zp, 0, t[pos]), np.where(zp, end - pos, 0).astype(np.int64)


def write_table(bw: BitWriter, t: np.ndarray) -> None:
    _, k = table_bits(t)
    bw.bits(k, 5)
    vals, runs = _table_tokens(t)
    for v, r in zip(vals.tolist(), runs.tolist()):
        bw.eg(v, k)
        if v == 0:
            bw.eg(r - 1)


def choose_table(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Quantized table minimizing (data bits under it + its own bits); returns (table, total bits)."""
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    top = max(2, int(n).bit_length())
    # Table precisions 2..top, stopping at the first that holds the counts exactly. All the
    # candidate tables are quantized and costed in one batch: row i of ``q`` is
    # ``quantize_counts(c, bits[i])`` and each row's probabilities are normalized on their own.
    bits = []
    for b in range(2, top + 1):
        bits.append(b)
        if n <= (1 << b):
            break
    if n == 0:
        q = np.broadcast_to(c, (len(bits), c.size))
    else:
        scale = np.array([1 << b for b in bits], dtype=np.int64)[:, None]
        q = np.where(scale >= n, c[None, :], np.where(c > 0, np.maximum((c * scale + n // 2) // n, 1), 0))
    costs = cost_bits(q) if c.size else np.zeros((len(bits), 0))
    cf = c.astype(np.float64)
    best = None
    for i in range(len(bits)):
        total = (float((cf * costs[i]).sum()) if n else 0.0) + table_bits(q[i])[0]
        if best is None or total < best[1] - 1e-9:
            best = (np.array(q[i]), total)
    return best


def fit_row_prediction(x: np.ndarray, block: int = 256) -> RowPred:
    """Greedy choice per row of the predictor that saves the most estimated bits (or none).

    Savings are estimated from residual energy (Gaussian rate 0.5*log2 of the energy ratio per
    symbol) minus the side-information bits of the choice. The loop runs as a kernel
    (``kernels.rowpred``); :func:`fit_row_prediction_ref` is its numpy reference.
    """
    rows, cols = x.shape
    if rows < 2 or cols == 0:
        return RowPred(np.zeros(rows, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    mode, ref, coef = choose_row_predictors(x, PRED_DEN, PRED_KMAX, MODE_GROUP, MODE_ROW, block)
    return RowPred(mode, ref[mode == MODE_GROUP], ref[mode == MODE_ROW], coef[mode != MODE_NONE])


def fit_row_prediction_ref(x: np.ndarray, block: int = 256) -> RowPred:
    """Numpy reference for :func:`fit_row_prediction`."""
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
        # Earlier rows only; clipped, as float32 Gram entries can overshoot slightly.
        best = best_prior_rho2(gram, nrm, b0)
        e = nrm[b0:b1] * (1 - best) + cols / 12.0  # the rounded prediction adds 1/12 per symbol
        gain = 0.5 * cols * np.log2((nrm[b0:b1] + floor) / (e + floor)) - np.log2(np.arange(b0, b1) + 1) - 5.5
        hits += int((gain > 0).sum())
    return hits / rows


def fit_rc_offsets(
    ys: list[np.ndarray],
    u: list[np.ndarray],
    v: list[np.ndarray],
    m: list[np.ndarray],
    cache: CostCache,
    s_range: tuple[int, int],
    rounds: int = 2,
    window: int = 2,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Alternating ML fit of row offsets u and column scales v, key (u_r + v_c, m_c).

    Costs are gathered per symbol from one dense table over the key range, so the work is
    O(symbols x window) per pass whatever the number of distinct keys (``kernels.rowcost``).
    """
    s_min, s_max = s_range
    u = [np.asarray(a, np.int64).copy() for a in u]
    v = [np.asarray(a, np.int64).copy() for a in v]
    m = [np.asarray(a, np.int64) for a in m]
    if not ys:
        return u, v
    # The table holds the mean indices that occur, not their whole range: column means are
    # sparse over it on wide alphabets, and every table row depends on its own key only.
    m_vals = np.unique(np.concatenate(m))
    m_n = len(m_vals)
    m_idx = [np.searchsorted(m_vals, a) for a in m]
    for _ in range(rounds):
        for axis in (0, 1):  # rows, then columns
            s_lo = max(s_min, min(int(a.min()) for a in u) + min(int(b.min()) for b in v) - window)
            s_hi = min(s_max, max(int(a.max()) for a in u) + max(int(b.max()) for b in v) + window)
            if s_hi < s_lo:
                s_hi = s_lo
            grid = np.stack(np.meshgrid(np.arange(s_lo, s_hi + 1), m_vals, indexing="ij"), -1)
            table = cache.costs(grid.reshape(-1, 2))  # ((S * M), n)
            flat = table.ravel()
            for t, y in enumerate(ys):
                line, other = (u[t], v[t]) if axis == 0 else (v[t], u[t])
                best_s = offset_pass(y, line, other, m_idx[t], flat, s_lo, s_hi, m_n, window, axis)
                if axis == 0:
                    u[t] = best_s
                else:
                    v[t] = best_s
    return u, v
