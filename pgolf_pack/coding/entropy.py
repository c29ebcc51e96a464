"""Model-based entropy coding of one group of integer symbol matrices (ANS via ``constriction``).

A group (e.g. the ``mlp.fc`` symbols of every layer) is coded with one of these models, each a
set of contexts with one probability table per context:

* ``hist`` – one exact-histogram table per tensor (counts quantized, stored in the header);
* ``col``  – per-column (input feature) discretized Gaussian or Laplace: a scale index per column
  on a log grid and optionally a mean index; tables are computed from the indices, never stored.
  Rows may be split into a few row classes (found by clustering), each with its own columns;
* ``row``  – a scale (and mean) index per row;
* ``rc``   – like ``col`` plus a scale offset per row (the symbol's scale is row x column);
* ``ref``  – each row may first be predicted from an earlier row or from the running mean of a
  group of earlier rows; the residuals are coded with ``rc``.

``auto`` fits every model (``ref`` only when row prediction would touch enough rows) and keeps
the shortest code, running the coder only on models whose bounded length can still win. On the
bench checkpoint's int6 RTN symbols each column is close to a discretized Gaussian (the heavy
tails of a whole tensor come from columns of different scale), so the parametric tables cost
within 0.1% of per-column empirical ones and need no storage.

Values outside a core window of at most ``MAX_CORE`` symbols become escape symbols; their
magnitudes follow as ANS-coded bit-length buckets plus raw mantissa bits, so wide (int16/int32)
ranges stay exact and cheap. Model probabilities are derived only from stored integers with
platform-independent arithmetic (see ``entropy_models``), so any machine decodes the bytes.

Buffer: ``PGE`` + version + model id, varint payload length, CRC32 of the payload; payload =
side-information bits (core, model parameters, count tables), escape mantissas, ANS words.

This module is the encoder (model search, fits, ``entropy_encode``, ``estimate_bits``); what the
decoder needs lives in :mod:`.entropy_decode` and :mod:`.entropy_tables`, which never import
from here. ``entropy_decode`` and ``MODELS`` are re-exported for callers that use both sides.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import constriction
import numpy as np

from ..kernels.anslen import ans_words_bounds
from ..kernels.ctxsort import escape_parts, pack_mantissas, stable_order
from ..kernels.fitcost import line_moments
from ..kernels.rowcost import row_costs
from .entropy_decode import (  # noqa: F401  (entropy_decode re-exported for callers of both sides)
    _BUCKETS,
    _MODEL_ID,
    MAGIC,
    MAX_CLASSES,
    MAX_CORE,
    MAX_STREAM_SPAN,
    MODELS,
    VERSION,
    Core,
    _build,
    _cat,
    _categorical,
    _check_range,
    _flat_ctx,
    _layout,
    _residual_range,
    _roff_sizes,
    _shape2d,
    _Spec,
    _split,
    _vshapes,
    entropy_decode,
)
from .entropy_models import (
    FAMILIES,
    BitWriter,
    CostCache,
    Param,
    RowPred,
    axis_hists,
    choose_table,
    cost_bits,
    effective_probs,
    fit_lines,
    fit_rc_offsets,
    fit_row_prediction,
    run_row_prediction,
    single_ref_share,
    write_table,
)

_SCALE_LIMITS = (-6, 24)  # scale grid spans 2**-6 .. 2**24 symbols


# ---------------------------------------------------------------------------------------------
# Input, core window and escapes (encode side)


def _prepare(arrays: Sequence[np.ndarray], lo: int, hi: int) -> list[np.ndarray]:
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype.kind not in "iu":
            raise TypeError(f"array {i}: entropy coding needs integer symbols, got {a.dtype}")
        m = a.reshape(_shape2d(a.shape)).astype(np.int64)
        if m.size and (m.min() < lo or m.max() > hi):
            raise ValueError(f"array {i}: symbols [{m.min()}, {m.max()}] lie outside [{lo}, {hi}]")
        out.append(m)
    return out


def _choose_core(mats: list[np.ndarray], lo: int) -> Core:
    flat = np.concatenate([m.ravel() for m in mats]) if mats else np.zeros(0, np.int64)
    if flat.size == 0:
        return Core(lo, lo, False)
    dmin, dmax = int(flat.min()), int(flat.max())
    if dmax - dmin + 1 <= MAX_CORE:
        return Core(dmin, dmax, False)
    vals, cnts = np.unique(flat, return_counts=True)
    med = int(vals[np.searchsorted(np.cumsum(cnts), (flat.size + 1) // 2)])
    n_all = float(flat.size)
    best = None
    widths = [w for w in (4 << i for i in range(30)) if 2 * w + 1 <= MAX_CORE] + [(MAX_CORE - 1) // 2]
    for w in widths:
        clo, chi = max(med - w, dmin), min(med + w, dmax)
        inside = (vals >= clo) & (vals <= chi)
        ci, co = cnts[inside].astype(np.float64), cnts[~inside]
        dist = np.where(vals[~inside] < clo, clo - 1 - vals[~inside], vals[~inside] - chi - 1)
        bits = float(-(ci * np.log2(ci / n_all)).sum())
        if co.size:
            nesc = float(co.sum())
            bits += -nesc * np.log2(nesc / n_all) + float((co * (2 * np.floor(np.log2(dist + 1)) + 1)).sum())
        bits += 4.0 * (chi - clo + 1)  # rough table cost, keeps the window from growing for nothing
        if best is None or bits < best[0]:
            best = (bits, clo, chi)
    return Core(best[1], best[2], True)


def _to_alphabet(m: np.ndarray, core: Core) -> np.ndarray:
    y = m - core.clo
    if core.esc:
        y = np.where(m < core.clo, core.ncore, np.where(m > core.chi, core.ncore + 1, y))
    return y.astype(np.int32)


def _vsplit(mats: list[np.ndarray], layout) -> list[np.ndarray]:
    return [mats[t] if idx is None else mats[t][idx] for t, idx in layout]


# ---------------------------------------------------------------------------------------------
# Fits (encoder only)


def _transforms(x: np.ndarray, seg: list[int] | None) -> list[tuple[int, int, np.ndarray]]:
    """Candidate codings of a side stream: (kind, lag, values). Kind 0 raw, 1 delta to the
    previous element, 2 delta to the element one segment back (e.g. the same column of the
    previous layer, whose scales are often nearly equal). Deltas start from x[0] (stored apart),
    so a large common offset never widens the coded alphabet."""
    x = np.asarray(x, dtype=np.int64)
    out = [(0, 0, x)]
    if x.size > 1:
        out.append((1, 1, np.diff(x, prepend=x[0])))
    if seg and len(seg) > 1 and len(set(seg)) == 1 and 1 < seg[0] < x.size:
        lag = seg[0]
        d = np.diff(x, prepend=x[0])
        d[lag:] = x[lag:] - x[:-lag]
        out.append((2, lag, d))
    return out


def _raw_stream_bits(x: np.ndarray) -> float:
    if x.size == 0 or x.min() == x.max():
        return 24.0
    return choose_table(np.bincount(x - x.min()))[1] + 32.0


def _stream_bits(x: np.ndarray, seg: list[int] | None = None) -> float:
    return min(_raw_stream_bits(d) for _, _, d in _transforms(x, seg))


def _srange(param: Param) -> tuple[int, int]:
    return _SCALE_LIMITS[0] * param.q, _SCALE_LIMITS[1] * param.q


def _fit_hist(vys: list[np.ndarray], core: Core) -> _Spec:
    return _Spec("hist", tables=[choose_table(np.bincount(y.ravel(), minlength=core.n))[0] for y in vys])


def _fit_axis(hists: list[np.ndarray], core: Core, param: Param,
              moments: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[float, list[np.ndarray]]:
    s, m, cost = fit_lines(hists, param, core.clo, core.chi, core.esc, core.values(), _srange(param), moments=moments)
    s_all, m_all = _cat(s), _cat(m)
    seg = [len(x) for x in s]
    return cost + _stream_bits(s_all, seg) + _stream_bits(m_all, seg), [s_all, m_all]


def _search_param(vys: list[np.ndarray], core: Core, axis: int) -> tuple[float, Param, list[np.ndarray]]:
    """Greedy search: family at Q=8, then the scale grid Q, then the mean grid M."""
    hists = axis_hists(vys, core.n, axis)
    # Every param below starts from the same line moments.
    moments = [line_moments(h, core.values()) for h in hists]
    best = None
    for p in [Param(f, 8, 0) for f in FAMILIES]:
        r = _fit_axis(hists, core, p, moments)
        if best is None or r[0] < best[0]:
            best = (r[0], p, r[1])
    for q in (4, 6, 12, 16):
        p = Param(best[1].family, q, 0)
        r = _fit_axis(hists, core, p, moments)
        if r[0] < best[0]:
            best = (r[0], p, r[1])
    for mstep in (1, 2, 4, 8):
        p = Param(best[1].family, best[1].q, mstep)
        r = _fit_axis(hists, core, p, moments)
        if r[0] < best[0]:
            best = (r[0], p, r[1])
    return best


def _fit_row(ys: list[np.ndarray], core: Core) -> _Spec:
    vys = [y for y in ys if y.size]
    _, p, side = _search_param(vys, core, 0)
    return _Spec("row", p, side=side)


def _row_projection(x: np.ndarray) -> np.ndarray:
    """Each row's coordinate along the top principal direction (power iteration).

    Products go through ``einsum`` rather than BLAS: these matrix-vector sizes are far below
    where threads pay off, and a multi-threaded BLAS on a busy machine is many times slower.
    """
    xc = x - x.mean(axis=0)
    v = np.ones(x.shape[1]) / np.sqrt(max(x.shape[1], 1))
    for _ in range(20):
        v = np.einsum("rc,r->c", xc, np.einsum("rc,c->r", xc, v))
        nv = np.sqrt(np.einsum("c,c->", v, v))
        if nv == 0:
            break
        v /= nv
    return np.einsum("rc,c->r", xc, v)


def _kmeans_rows(x: np.ndarray, k: int, iters: int = 12, proj: np.ndarray | None = None) -> np.ndarray:
    """Deterministic k-means on rows, seeded by quantiles of ``proj`` (default: the rows' top
    principal coordinate, which does not depend on k, so callers trying several k pass it)."""
    proj = _row_projection(x) if proj is None else proj
    label = np.minimum((np.argsort(np.argsort(proj, kind="stable"), kind="stable") * k) // len(proj), k - 1)
    sq = np.einsum("rc,rc->r", x, x)
    for _ in range(iters):
        cent = np.stack([x[label == j].mean(axis=0) if (label == j).any() else x[0] for j in range(k)])
        d = sq[:, None] - 2 * np.einsum("rc,kc->rk", x, cent) + np.einsum("kc,kc->k", cent, cent)[None, :]
        new = d.argmin(axis=1)
        if np.array_equal(new, label):
            break
        label = new
    return label


def _row_costs(y: np.ndarray, cache: CostCache, s: np.ndarray, m: np.ndarray) -> np.ndarray:
    return row_costs(y, cache.costs(np.stack([s, m], axis=1)))  # costs: (C, n)


def _fit_classes(
    ys: list[np.ndarray], core: Core, param: Param, k: int, rounds: int = 3, seeds: dict | None = None
) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """Row classes (each with its own column parameters) by k-means, then by code length.
    ``seeds`` keeps each tensor's row values and principal coordinates across calls (any k)."""
    values = core.values()
    cache = CostCache(param, core.clo, core.chi, core.esc)
    shapes = [y.shape for y in ys]
    seeds = {} if seeds is None else seeds
    labels = []
    for t, y in enumerate(ys):
        if y.shape[0] >= 2 * k and y.shape[1]:
            if t not in seeds:
                x = values[y]
                seeds[t] = (x, _row_projection(x))
            labels.append(_kmeans_rows(seeds[t][0], k, proj=seeds[t][1]))
        else:
            labels.append(np.zeros(y.shape[0], np.int64))
    best = None
    for it in range(rounds + 1):
        rowclass = _cat(labels)
        layout = _layout(shapes, rowclass, k)
        vys = _vsplit(ys, layout)
        cost, side = _fit_axis(axis_hists(vys, core.n, 1), core, param)
        cost += _stream_bits(rowclass)
        if best is None or cost < best[0]:
            best = (cost, rowclass, side)
        if it == rounds:
            break
        ss = _split(side[0], [c for _, c in _vshapes(layout, shapes)])
        ms = _split(side[1], [c for _, c in _vshapes(layout, shapes)])
        prior = -np.log2(np.maximum(np.bincount(rowclass, minlength=k), 1) / max(len(rowclass), 1))
        # Reassign every row to the class whose columns code it cheapest (classes that are
        # empty in a tensor have no columns there and stay empty).
        costs = [np.full((y.shape[0], k), np.inf) for y in ys]
        for (t, idx), s, m in zip(layout, ss, ms):
            cls = int(labels[t][idx[0]])
            costs[t][:, cls] = _row_costs(ys[t], cache, s, m) + prior[cls]
        new = [c.argmin(axis=1) if len(c) else np.zeros(0, np.int64) for c in costs]
        if all(np.array_equal(a, b) for a, b in zip(new, labels)):
            break
        labels = new
    return best


def _fit_col(ys: list[np.ndarray], core: Core, try_classes: bool = True) -> tuple[float, _Spec]:
    vys = [y for y in ys if y.size]
    cost, p, side = _search_param(vys, core, 1)
    best = (cost, _Spec("col", p, side=side))
    if not try_classes:
        return best
    # More row classes only pay when the previous count already did.
    seeds: dict = {}
    for k in range(2, MAX_CLASSES + 1):
        if not any(y.shape[0] >= 2 * k for y in ys):
            break
        c, rowclass, side = _fit_classes(ys, core, p, k, seeds=seeds)
        if c >= best[0]:
            break
        best = (c, _Spec("col", p, nclass=k, rowclass=rowclass, side=side))
    return best


def _fit_rc(ys: list[np.ndarray], core: Core, col: _Spec, model: str = "rc") -> _Spec:
    param = col.param
    cache = CostCache(param, core.clo, core.chi, core.esc)
    shapes = [y.shape for y in ys]
    layout = _layout(shapes, col.rowclass, col.nclass)
    vys = _vsplit(ys, layout)
    vsh = _vshapes(layout, shapes)
    vs = _split(col.side[0], [c for _, c in vsh])
    ms = _split(col.side[1], [c for _, c in vsh])
    us = [np.zeros(r, np.int64) for r, _ in vsh]
    us, vs = fit_rc_offsets(vys, us, vs, ms, cache, _srange(param))
    return _Spec(model, param, nclass=col.nclass, rowclass=col.rowclass, side=[_cat(us), _cat(vs), _cat(ms)])


# ---------------------------------------------------------------------------------------------
# Header (side information)


@dataclass
class _Stream:
    """An integer side stream, transformed (see ``_transforms``) and coded with a stored count
    table after subtracting ``base``."""

    values: np.ndarray  # transformed values
    base: int
    table: np.ndarray | None
    kind: int = 0
    lag: int = 0
    anchor: int = 0


def _make_stream(x: np.ndarray, seg: list[int] | None = None) -> _Stream:
    best = None
    for kind, lag, d in _transforms(x, seg):
        bits = _raw_stream_bits(d)
        if best is None or bits < best[0]:
            best = (bits, kind, lag, d)
    _, kind, lag, d = best
    anchor = int(x[0]) if kind else 0
    if d.size == 0 or d.min() == d.max():
        return _Stream(d, int(d[0]) if d.size else 0, None, kind, lag, anchor)
    base = int(d.min())
    return _Stream(d, base, choose_table(np.bincount(d - base))[0], kind, lag, anchor)


def _write_stream(bw: BitWriter, s: _Stream) -> None:
    bw.bits(s.kind, 2)
    if s.kind:
        bw.eg(s.lag)
        bw.se(s.anchor)
    bw.se(s.base)
    bw.eg(len(s.values))
    bw.eg(0 if s.table is None else len(s.table) - 1)
    if s.table is not None:
        write_table(bw, s.table)


def _pred_streams(preds: list[RowPred]) -> list[np.ndarray]:
    return [_cat([p.mode for p in preds]), _cat([p.gidx for p in preds]), _cat([p.coef for p in preds])]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@dataclass
class _Segment:
    """One run of symbols in ANS decode order: categorical (weights) or uniform (sizes)."""

    symbols: np.ndarray
    weights: np.ndarray | None = None
    sizes: np.ndarray | None = None

    def bits(self) -> float:
        if self.weights is not None:
            return float(cost_bits(self.weights)[0][self.symbols].sum())
        return float(np.log2(self.sizes.astype(np.float64)).sum())


@dataclass
class EntropyModel:
    """A fitted model of one group: predicted size, per-symbol costs and the encoder."""

    spec: _Spec
    core: Core
    lo: int
    hi: int
    shapes: list[tuple[int, int]]
    coded: list[np.ndarray]  # values the model codes: the symbols, or row-prediction residuals
    layout: list[tuple[int, np.ndarray | None]]
    vys: list[np.ndarray]
    vctx: list[np.ndarray]
    weights: np.ndarray
    # Derived once per model (symbol order, escapes, assembled segments): bits() and encode()
    # both need them, and each costs passes over every symbol.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def model(self) -> str:
        return self.spec.model

    def _vshapes(self) -> list[tuple[int, int]]:
        return [y.shape for y in self.vys]

    def symbol_bits(self, t: int) -> np.ndarray:
        """Bits spent on each symbol of tensor ``t`` (escape magnitudes included), side info excluded."""
        costs = cost_bits(self.weights)
        bucket = self._bucket_costs()
        out = np.zeros(self.shapes[t])
        for (tt, idx), y, c in zip(self.layout, self.vys, self.vctx):
            if tt != t:
                continue
            bits = costs[np.broadcast_to(c, y.shape), y]
            if self.core.esc:
                esc = y >= self.core.ncore
                if esc.any():
                    vals = self.coded[t] if idx is None else self.coded[t][idx]
                    b, _ = escape_parts(vals[esc], self.core.clo, self.core.chi)
                    bits = bits.copy()
                    bits[esc] += bucket[b] + b
            if idx is None:
                out[:] = bits
            else:
                out[idx] = bits
        return out

    def value_costs(self, t: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ctx, costs): value ``values[j]`` at (r, c) of tensor t costs ``costs[ctx[r, c], j]`` bits.

        ``ctx`` has the tensor's 2-D shape. For rate-distortion quantizers, which choose symbols
        while holding the model fixed. Not defined for ``ref``, whose costs depend on other rows.
        """
        if self.model == "ref":
            raise ValueError("value_costs is not defined for the ref model (its predictions depend on other rows)")
        v = np.asarray(values, dtype=np.int64)
        inside = (v >= self.lo) & (v <= self.hi)
        if not self.core.esc:
            inside &= (v >= self.core.clo) & (v <= self.core.chi)
        y = _to_alphabet(np.where(inside, v, self.core.clo), self.core)
        costs = cost_bits(self.weights)[:, y]
        # Values the fitted model cannot code (outside [lo, hi], or outside an escape-free core).
        costs[:, ~inside] = np.inf
        if self.core.esc:
            esc = (y >= self.core.ncore) & inside
            if esc.any():
                b, _ = escape_parts(v[esc], self.core.clo, self.core.chi)
                costs[:, esc] += (self._bucket_costs()[b] + b)[None, :]
        ctx = np.zeros(self.shapes[t], np.int64)
        for (tt, idx), c, y in zip(self.layout, self.vctx, self.vys):
            if tt == t:
                if idx is None:
                    ctx[:] = np.broadcast_to(c, y.shape)
                else:
                    ctx[idx] = np.broadcast_to(c, y.shape)
        return ctx, costs

    def _escapes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(buckets, mantissas) of escaped values in ANS decode order, or None without escapes."""
        if not self.core.esc:
            return None
        if "esc" not in self._memo:
            order, fy = self._sorted()
            at = order[fy >= self.core.ncore]  # flat positions of the escapes, in decode order
            self._memo["esc"] = escape_parts(self._flat_coded(at), self.core.clo, self.core.chi)
        return self._memo["esc"]

    def _flat_coded(self, at: np.ndarray) -> np.ndarray:
        """Coded values at flat positions ``at`` of the virtual tensors (concatenated, row-major),
        gathered without concatenating every value."""
        sizes = [y.size for y in self.vys]
        starts = np.cumsum([0] + sizes)
        vt = np.searchsorted(starts, at, side="right") - 1
        out = np.empty(at.shape, np.int64)
        for i, (t, idx) in enumerate(self.layout):
            sel = np.flatnonzero(vt == i)
            if sel.size:
                r, c = np.divmod(at[sel] - starts[i], self.vys[i].shape[1])
                out[sel] = self.coded[t][r if idx is None else idx[r], c]
        return out

    def _bucket_table(self) -> np.ndarray | None:
        e = self._escapes()
        if e is None or e[0].size == 0:
            return None
        return choose_table(np.bincount(e[0], minlength=_BUCKETS))[0]

    def _bucket_costs(self) -> np.ndarray:
        t = self._bucket_table()
        return np.full(_BUCKETS, 8.0) if t is None else cost_bits(t)[0]

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, symbols in that order): every symbol grouped by context, stably (the order
        ``entropy_decode``'s ``_sort_order`` rebuilds), by a counting sort."""
        if "order" not in self._memo:
            order = stable_order(_flat_ctx(self.vctx, self._vshapes()), self.weights.shape[0])
            self._memo["order"] = (order, _cat([y.ravel() for y in self.vys])[order])
        return self._memo["order"]

    def _assemble(self) -> tuple[bytes, bytes, list[_Segment]]:
        """Header bits, escape mantissa bytes and the ANS segments in decode order."""
        if "asm" not in self._memo:
            self._memo["asm"] = self._assemble_uncached()
            self._memo.pop("order", None)  # a symbol-sized index nothing needs once assembled
        return self._memo["asm"]

    def _assemble_uncached(self) -> tuple[bytes, bytes, list[_Segment]]:
        bw = BitWriter()
        spec = self.spec
        nsym = sum(r * c for r, c in self.shapes)
        bw.eg(len(self.shapes))
        bw.eg(nsym)
        base = _residual_range(self.lo, self.hi)[0] if spec.model == "ref" else self.lo
        bw.eg(self.core.clo - base)
        bw.eg(self.core.ncore - 1)
        bw.bits(int(self.core.esc), 1)
        if spec.model == "hist":
            for t in spec.tables:
                write_table(bw, t)
        else:
            bw.bits(FAMILIES.index(spec.param.family), 1)
            bw.bits(spec.param.q, 5)
            bw.bits(spec.param.m, 4)
            bw.bits(spec.nclass - 1, 2)
        segs: list[_Segment] = []
        streams: list[tuple[np.ndarray, list[int] | None]] = []
        if spec.model == "ref":
            streams += [(x, None) for x in _pred_streams(spec.pred)]
        if spec.nclass > 1:
            streams.append((spec.rowclass, None))
        n_pred = len(streams) if spec.model == "ref" else 0
        vsh = self._vshapes()
        rows_seg, cols_seg = [r for r, _ in vsh], [c for _, c in vsh]
        segsizes = {"col": [cols_seg, cols_seg], "row": [rows_seg, rows_seg]}.get(spec.model, [rows_seg, cols_seg, cols_seg])
        streams += list(zip(spec.side, segsizes))
        made = [_make_stream(x, seg) for x, seg in streams]
        max_len = max(sum(r for r, _ in self.shapes), sum(c for _, c in self.shapes)) * MAX_CLASSES
        if any(s.table is not None and len(s.table) - 1 > max(MAX_STREAM_SPAN, 2 * max_len + 2) for s in made):
            raise ValueError("a side stream is wider than the decoder accepts")
        for s in made:
            _write_stream(bw, s)
        for i, s in enumerate(made):
            if s.table is not None and s.values.size:
                segs.append(_Segment((s.values - s.base).astype(np.int32), weights=s.table[None, :].astype(np.float64)))
            if spec.model == "ref" and i == n_pred - 1 - (spec.nclass > 1):
                roff = _cat([p.roff for p in spec.pred])
                sizes = _roff_sizes([p.mode for p in spec.pred])
                keep = sizes >= 2
                if keep.any():
                    segs.append(_Segment(roff[keep].astype(np.int32), sizes=sizes[keep].astype(np.int32)))
        _, fy = self._sorted()
        counts = np.bincount(_flat_ctx(self.vctx, self._vshapes()), minlength=self.weights.shape[0])
        ends = np.cumsum(counts)
        for j in range(len(counts)):
            if counts[j]:
                segs.append(_Segment(fy[ends[j] - counts[j]:ends[j]], weights=self.weights[j:j + 1]))
        esc_bytes = b""
        if self.core.esc:
            buckets, mant = self._escapes()
            bw.bits(int(buckets.size > 0), 1)
            if buckets.size:
                table = choose_table(np.bincount(buckets, minlength=_BUCKETS))[0]
                write_table(bw, table)
                segs.append(_Segment(buckets.astype(np.int32), weights=table[None, :].astype(np.float64)))
                esc_bytes = pack_mantissas(buckets, mant)
        return bw.getvalue(), esc_bytes, segs

    def bits(self) -> float:
        """Predicted size of ``encode()`` in bits (exact side information, ideal ANS rate)."""
        side, esc, segs = self._assemble()
        ans = sum(s.bits() for s in segs)
        return 8.0 * _buffer_size(side, esc, 4 * int(np.ceil(ans / 32.0)) if ans > 0 else 0)

    def size_bounds(self) -> tuple[int, int] | None:
        """(lo, hi): ``len(encode())`` certainly lies in [lo, hi] (header and escapes exact, ANS
        words bounded by ``kernels.anslen``); None when a segment is coded uniformly (``ref``)."""
        side, esc, segs = self._assemble()
        if any(s.weights is None for s in segs):
            return None
        lo, hi = ans_words_bounds([(s.symbols, _coder_probs(s.weights)) for s in segs])
        return _buffer_size(side, esc, 4 * lo), _buffer_size(side, esc, 4 * hi)

    def encode(self) -> bytes:
        side, esc, segs = self._assemble()
        coder = constriction.stream.stack.AnsCoder()
        for s in reversed(segs):
            if s.weights is not None:
                coder.encode_reverse(s.symbols, _categorical(s.weights))
            else:
                coder.encode_reverse(s.symbols, constriction.stream.model.Uniform(), s.sizes)
        ans = coder.get_compressed().astype("<u4").tobytes()
        payload = _varint(len(side)) + side + _varint(len(esc)) + esc + ans
        head = MAGIC + bytes([VERSION, _MODEL_ID[self.spec.model]]) + _varint(len(payload))
        return head + struct.pack("<I", zlib.crc32(payload)) + payload


def _coder_probs(weights: np.ndarray) -> np.ndarray:
    # The probabilities ``_categorical`` hands constriction for this table.
    p = effective_probs(weights)[0]
    return np.array([1.0, 0.0]) if p.size == 1 else p


def _buffer_size(side: bytes, esc: bytes, ans_bytes: int) -> int:
    """Length of the buffer ``encode()`` writes around these parts (see the module docstring)."""
    payload = len(_varint(len(side))) + len(side) + len(_varint(len(esc))) + len(esc) + ans_bytes
    return len(MAGIC) + 2 + len(_varint(payload)) + 4 + payload


def _shortest(fits: list[EntropyModel], bounded: bool = True) -> tuple[bytes, EntropyModel] | None:
    """The shortest encoding of the fits (the first on a tie), running the coder only on the
    fits that can be shortest: one whose length is surely above another's upper bound is
    strictly longer than that one, so it can neither win nor tie (``bounded=False``: every fit
    is encoded)."""
    bounds = [f.size_bounds() for f in fits] if bounded and len(fits) > 1 else [None] * len(fits)
    known = [b[1] for b in bounds if b is not None]
    cap = min(known) if known else None
    best: tuple[bytes, EntropyModel] | None = None
    for f, b in zip(fits, bounds):
        if b is not None and cap is not None and b[0] > cap:
            continue
        buf = f.encode()
        if b is not None and not b[0] <= len(buf) <= b[1]:
            # The installed constriction codes unlike the replica the bounds rest on (another
            # version?): they prove nothing then, so every fit is encoded.
            return _shortest(fits, bounded=False)
        if best is None or len(buf) < len(best[0]):
            best = (buf, f)
    return best


def _make(spec: _Spec, core: Core, lo: int, hi: int, coded: list[np.ndarray], ys: list[np.ndarray]) -> EntropyModel:
    """The model of ``coded``, whose alphabet indices under ``core`` are ``ys`` (shared by fits)."""
    shapes = [m.shape for m in coded]
    layout = _layout(shapes, spec.rowclass, spec.nclass)
    vys = _vsplit(ys, layout)
    vctx, weights = _build(spec, [y.shape for y in vys], core)
    return EntropyModel(spec, core, lo, hi, shapes, coded, layout, vys, vctx, weights)


# In ``auto`` the ref model is fitted only when one earlier row would profitably predict this
# share of rows. On the bench checkpoint the int6 groups score 0.00-0.21 and ref never beat
# col/rc there; the embedding scores 0.88 and ref wins.
AUTO_REF_MIN_SHARE = 0.25
# Row prediction searches every earlier row for every row, so its cost grows with rows squared:
# a 70,000-row vocabulary takes minutes. ``auto`` leaves ``ref`` out above this many rows in one
# tensor (an explicit ``model="ref"`` still runs).
AUTO_REF_MAX_ROWS = 16384


def _fit_ref(mats: list[np.ndarray], lo: int, hi: int, min_share: float = 0.0) -> EntropyModel | None:
    if min_share > 0:
        if any(m.shape[0] > AUTO_REF_MAX_ROWS for m in mats):
            return None
        rows = sum(m.shape[0] for m in mats)
        if rows == 0 or sum(single_ref_share(m) * m.shape[0] for m in mats) < min_share * rows:
            return None
    preds = [fit_row_prediction(m) for m in mats]
    rows = sum(len(p.mode) for p in preds)
    if min_share > 0 and (rows == 0 or sum(int((p.mode != 0).sum()) for p in preds) < min_share * rows):
        return None
    res = [run_row_prediction(m, p, decode=False) for m, p in zip(mats, preds)]
    core = _choose_core(res, _residual_range(lo, hi)[0])
    ys = [_to_alphabet(m, core) for m in res]
    _, col = _fit_col(ys, core)
    spec = _fit_rc(ys, core, col, "ref")
    spec.pred = preds
    return _make(spec, core, lo, hi, res, ys)


def fit_models(
    arrays: Sequence[np.ndarray], lo: int, hi: int, models: Sequence[str] = MODELS, auto: bool = False
) -> list[EntropyModel]:
    """Fit each requested model to the group (encoder side).

    With ``auto`` the candidates ``entropy_encode(model="auto")`` would try are fitted: ``ref``
    is left out when row prediction finds too few rows to help.
    """
    lo, hi = _check_range(lo, hi)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown entropy model {unknown[0]!r}; choose from {', '.join(MODELS)} or auto")
    mats = _prepare(arrays, lo, hi)
    core = _choose_core(mats, lo)
    ys = [_to_alphabet(m, core) for m in mats]
    out: dict[str, EntropyModel] = {}
    col: _Spec | None = None
    for name in models:
        if name == "ref":
            r0, r1 = _residual_range(lo, hi)
            fit = None if r0 < -(2**33) or r1 >= 2**33 else _fit_ref(mats, lo, hi, AUTO_REF_MIN_SHARE if auto else 0.0)
            if fit is not None:
                out[name] = fit
            continue
        if name == "hist":
            spec = _fit_hist([y for y in ys if y.size], core)
        elif name == "row":
            spec = _fit_row(ys, core)
        else:
            col = col if col is not None else _fit_col(ys, core)[1]
            spec = col if name == "col" else _fit_rc(ys, core, col)
        out[name] = _make(spec, core, lo, hi, mats, ys)
    return [out[m] for m in models if m in out]


def fit_model(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> EntropyModel:
    """The fitted model ``entropy_encode`` would use (for ``auto``: the smallest coded size)."""
    if model == "auto":
        return _shortest(fit_models(arrays, lo, hi, auto=True))[1]
    return fit_models(arrays, lo, hi, [model])[0]


def entropy_encode_model(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> tuple[bytes, str]:
    """:func:`entropy_encode` and the model it used (``auto``: the shortest, first on a tie)."""
    fits = fit_models(arrays, lo, hi, auto=True) if model == "auto" else fit_models(arrays, lo, hi, [model])
    best = _shortest(fits)
    if best is None:
        raise ValueError(f"entropy model {model!r} cannot code this group (symbol range too wide)")
    return best[0], best[1].model


def entropy_encode(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> bytes:
    """Self-describing, deterministic bytes for a group of integer arrays with symbols in [lo, hi]."""
    return entropy_encode_model(arrays, lo, hi, model)[0]


def estimate_bits(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> float:
    """Predicted size in bits of ``entropy_encode(arrays, lo, hi, model)``."""
    if model == "auto":
        return min(f.bits() for f in fit_models(arrays, lo, hi, auto=True))
    return fit_model(arrays, lo, hi, model).bits()
