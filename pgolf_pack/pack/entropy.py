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

``auto`` codes with every model (``ref`` only when row prediction would touch enough rows) and
keeps the shortest. On the bench checkpoint's int6 RTN symbols each column is close to a
discretized Gaussian (the heavy tails of a whole tensor come from columns of different scale),
so the parametric tables cost within 0.1% of per-column empirical ones and need no storage.

Values outside a core window of at most ``MAX_CORE`` symbols become escape symbols; their
magnitudes follow as ANS-coded bit-length buckets plus raw mantissa bits, so wide (int16/int32)
ranges stay exact and cheap. Model probabilities are derived only from stored integers with
platform-independent arithmetic (see ``entropy_models``), so any machine decodes the bytes.

Buffer: ``PGE`` + version + model id, varint payload length, CRC32 of the payload; payload =
side-information bits (core, model parameters, count tables), escape mantissas, ANS words.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import constriction
import numpy as np

from ..errors import ArtifactError
from .entropy_models import (
    FAMILIES,
    MODE_GROUP,
    MODE_ROW,
    PRED_DEN,
    PRED_KMAX,
    BitReader,
    BitWriter,
    Param,
    RowPred,
    TableCache,
    axis_hists,
    choose_table,
    cost_bits,
    dense_codes,
    effective_probs,
    fit_lines,
    fit_rc_offsets,
    fit_row_prediction,
    pair_codes,
    read_table,
    run_row_prediction,
    single_ref_share,
    write_table,
)

MAGIC = b"PGE"
VERSION = 1
MODELS = ("hist", "col", "row", "rc", "ref")
_MODEL_ID = {m: i for i, m in enumerate(MODELS)}
MAX_CORE = 1024
MAX_CLASSES = 3
# |value| < 2**31 and residuals stay below 2**33, so an escape distance + 1 has at most 34 bits.
_BUCKETS = 35
_SCALE_LIMITS = (-6, 24)  # scale grid spans 2**-6 .. 2**24 symbols


# ---------------------------------------------------------------------------------------------
# Input handling


def _shape2d(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(np.prod(shape[1:]))


def _check_range(lo: int, hi: int) -> tuple[int, int]:
    lo, hi = int(lo), int(hi)
    if not -(2**31) <= lo <= hi < 2**31:
        raise ValueError(f"symbol range [{lo}, {hi}] must be non-empty and fit in int32")
    return lo, hi


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


def _residual_range(lo: int, hi: int) -> tuple[int, int]:
    """Range of x - round(k/PRED_DEN * x_ref) for x, x_ref in [lo, hi]."""
    p = -(-PRED_KMAX * max(abs(lo), abs(hi)) // PRED_DEN)
    return lo - p, hi + p


# ---------------------------------------------------------------------------------------------
# Core window and escapes


@dataclass(frozen=True)
class Core:
    clo: int
    chi: int
    esc: bool

    @property
    def ncore(self) -> int:
        return self.chi - self.clo + 1

    @property
    def n(self) -> int:
        return self.ncore + (2 if self.esc else 0)

    def values(self) -> np.ndarray:
        """Representative value of each alphabet index (escapes sit just outside the core)."""
        v = np.arange(self.clo, self.chi + 1, dtype=np.float64)
        return np.concatenate([v, [self.clo - 1, self.chi + 1]]) if self.esc else v


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


def _bit_length_minus1(w: np.ndarray) -> np.ndarray:
    b = np.floor(np.log2(w.astype(np.float64))).astype(np.int64)
    b = np.where((w >> b) == 0, b - 1, b)
    return np.where((w >> (b + 1)) > 0, b + 1, b)


def _escape_parts(v: np.ndarray, core: Core) -> tuple[np.ndarray, np.ndarray]:
    """Bucket (bit length - 1 of distance + 1) and mantissa of escaped values."""
    w = np.where(v < core.clo, core.clo - v, v - core.chi).astype(np.int64)
    b = _bit_length_minus1(w)
    return b, w - (np.int64(1) << b)


def _pack_mantissas(buckets: np.ndarray, mant: np.ndarray) -> bytes:
    order = np.argsort(buckets, kind="stable")
    b, m = buckets[order], mant[order]
    parts = []
    for k in np.unique(b):
        if k == 0:
            continue
        sel = m[b == k]
        parts.append(((sel[:, None] >> np.arange(k - 1, -1, -1)[None, :]) & 1).astype(np.uint8).ravel())
    return np.packbits(np.concatenate(parts)).tobytes() if parts else b""


def _unpack_mantissas(data: bytes, buckets: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    order = np.argsort(buckets, kind="stable")
    b = buckets[order]
    mant_sorted = np.zeros(len(b), dtype=np.int64)
    pos = 0
    for k in np.unique(b):
        if k == 0:
            continue
        sel = np.flatnonzero(b == k)
        need = len(sel) * int(k)
        if pos + need > len(bits):
            raise ArtifactError("escape mantissas are truncated")
        chunk = bits[pos:pos + need].reshape(len(sel), int(k)).astype(np.int64)
        mant_sorted[sel] = chunk @ (np.int64(1) << np.arange(k - 1, -1, -1, dtype=np.int64))
        pos += need
    if len(bits) - pos >= 8:
        raise ArtifactError("escape section has trailing bytes")
    mant = np.empty_like(mant_sorted)
    mant[order] = mant_sorted
    return mant


# ---------------------------------------------------------------------------------------------
# Model specification, shared by encoder and decoder


@dataclass
class _Spec:
    """Everything the header carries about a model besides the core window."""

    model: str
    param: Param | None = None
    tables: list[np.ndarray] | None = None  # hist: one quantized table per non-empty tensor
    nclass: int = 1
    rowclass: np.ndarray | None = None  # row class of every row (all tensors), when nclass > 1
    side: list[np.ndarray] = field(default_factory=list)  # col: [v, m]; row: [s, m]; rc/ref: [u, v, m]
    pred: list[RowPred] | None = None  # ref: per tensor


def _split(a: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1]) if sizes else []


def _cat(xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(xs) if xs else np.zeros(0, np.int64)


def _layout(shapes: list[tuple[int, int]], rowclass: np.ndarray | None, nclass: int) -> list[tuple[int, np.ndarray | None]]:
    """Virtual tensors in stream order: (tensor, rows or None for all); empty ones are skipped."""
    out: list[tuple[int, np.ndarray | None]] = []
    if nclass == 1:
        return [(t, None) for t, (r, c) in enumerate(shapes) if r * c]
    for t, cls in enumerate(_split(rowclass, [r for r, _ in shapes])):
        if shapes[t][1] == 0:
            continue
        for k in range(nclass):
            idx = np.flatnonzero(cls == k)
            if idx.size:
                out.append((t, idx))
    return out


def _vshapes(layout, shapes) -> list[tuple[int, int]]:
    return [(shapes[t][0] if idx is None else len(idx), shapes[t][1]) for t, idx in layout]


def _vsplit(mats: list[np.ndarray], layout) -> list[np.ndarray]:
    return [mats[t] if idx is None else mats[t][idx] for t, idx in layout]


def _vmerge(parts: list[np.ndarray], layout, shapes, dtype) -> list[np.ndarray]:
    out = [np.zeros(s, dtype=dtype) for s in shapes]
    for p, (t, idx) in zip(parts, layout):
        if idx is None:
            out[t] = p
        else:
            out[t][idx] = p
    return out


def _stream_lengths(spec: _Spec, vshapes: list[tuple[int, int]]) -> list[int]:
    rows = sum(r for r, _ in vshapes)
    cols = sum(c for _, c in vshapes)
    return {"col": [cols, cols], "row": [rows, rows], "rc": [rows, cols, cols], "ref": [rows, cols, cols]}.get(spec.model, [])


def _build(spec: _Spec, vshapes: list[tuple[int, int]], core: Core) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-virtual-tensor context maps (broadcastable) and the (K, n) weight table."""
    n = core.n
    if not vshapes:
        return [], np.ones((1, n))
    if spec.model == "hist":
        return [np.full((1, 1), i, np.int64) for i in range(len(vshapes))], np.stack(spec.tables).astype(np.float64)
    cache = TableCache(spec.param, core.clo, core.chi, core.esc)
    if spec.model in ("col", "row"):
        sizes = [c for _, c in vshapes] if spec.model == "col" else [r for r, _ in vshapes]
        uniq, inv = pair_codes(np.stack([spec.side[0], spec.side[1]], axis=1))
        ctx = [p[None, :] if spec.model == "col" else p[:, None] for p in _split(inv, sizes)]
        return ctx, cache.weights(uniq)
    us = _split(spec.side[0], [r for r, _ in vshapes])
    vs = _split(spec.side[1], [c for _, c in vshapes])
    ms = _split(spec.side[2], [c for _, c in vshapes])
    s_lo = min(int(u.min()) for u in us) + min(int(v.min()) for v in vs)
    m_lo = min(int(m.min()) for m in ms)
    m_span = max(int(m.max()) for m in ms) - m_lo + 1
    codes = [((u[:, None] + v[None, :] - s_lo) * m_span + (m - m_lo)[None, :]).ravel() for u, v, m in zip(us, vs, ms)]
    uniq, inv = dense_codes(_cat(codes))
    ctx = [p.reshape(s) for p, s in zip(_split(inv, [r * c for r, c in vshapes]), vshapes)]
    keys = np.stack([uniq // m_span + s_lo, uniq % m_span + m_lo], axis=1)
    return ctx, cache.weights(keys)


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


def _untransform(kind: int, lag: int, anchor: int, d: np.ndarray) -> np.ndarray:
    if kind == 0:
        return d
    if lag <= 0 or (kind == 2 and d.size % lag):
        raise ArtifactError("side information is corrupt (stream transform)")
    if kind == 1:
        return anchor + np.cumsum(d)
    out = d.reshape(-1, lag).copy()
    out[0] = anchor + np.cumsum(out[0])
    return np.cumsum(out, axis=0).reshape(-1)


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


def _fit_axis(hists: list[list[np.ndarray]], core: Core, param: Param) -> tuple[float, list[np.ndarray]]:
    cache = TableCache(param, core.clo, core.chi, core.esc)
    s, m, cost = fit_lines(hists, cache, core.values(), _srange(param))
    s_all, m_all = _cat(s), _cat(m)
    seg = [len(x) for x in s]
    return cost + _stream_bits(s_all, seg) + _stream_bits(m_all, seg), [s_all, m_all]


def _search_param(vys: list[np.ndarray], core: Core, axis: int) -> tuple[float, Param, list[np.ndarray]]:
    """Greedy search: family at Q=8, then the scale grid Q, then the mean grid M."""
    hists = [[h] for h in axis_hists(vys, core.n, axis)]
    best = None
    for p in [Param(f, 8, 0) for f in FAMILIES]:
        r = _fit_axis(hists, core, p)
        if best is None or r[0] < best[0]:
            best = (r[0], p, r[1])
    for q in (4, 6, 12, 16):
        p = Param(best[1].family, q, 0)
        r = _fit_axis(hists, core, p)
        if r[0] < best[0]:
            best = (r[0], p, r[1])
    for mstep in (1, 2, 4, 8):
        p = Param(best[1].family, best[1].q, mstep)
        r = _fit_axis(hists, core, p)
        if r[0] < best[0]:
            best = (r[0], p, r[1])
    return best


def _fit_row(ys: list[np.ndarray], core: Core) -> _Spec:
    vys = [y for y in ys if y.size]
    _, p, side = _search_param(vys, core, 0)
    return _Spec("row", p, side=side)


def _kmeans_rows(x: np.ndarray, k: int, iters: int = 12) -> np.ndarray:
    """Deterministic k-means on rows, seeded by quantiles of the top principal direction.

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
    proj = np.einsum("rc,c->r", xc, v)
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


def _row_costs(y: np.ndarray, cache: TableCache, s: np.ndarray, m: np.ndarray) -> np.ndarray:
    cst = cache.costs(np.stack([s, m], axis=1))  # (C, n)
    return cst[np.arange(y.shape[1])[None, :], y].sum(axis=1)


def _fit_classes(
    ys: list[np.ndarray], core: Core, param: Param, k: int, rounds: int = 3
) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """Row classes (each with its own column parameters) by k-means, then by code length."""
    values = core.values()
    cache = TableCache(param, core.clo, core.chi, core.esc)
    shapes = [y.shape for y in ys]
    labels = [_kmeans_rows(values[y], k) if y.shape[0] >= 2 * k and y.shape[1] else np.zeros(y.shape[0], np.int64) for y in ys]
    best = None
    for it in range(rounds + 1):
        rowclass = _cat(labels)
        layout = _layout(shapes, rowclass, k)
        vys = _vsplit(ys, layout)
        cost, side = _fit_axis([[h] for h in axis_hists(vys, core.n, 1)], core, param)
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
    for k in range(2, MAX_CLASSES + 1):
        if not any(y.shape[0] >= 2 * k for y in ys):
            break
        c, rowclass, side = _fit_classes(ys, core, p, k)
        if c >= best[0]:
            break
        best = (c, _Spec("col", p, nclass=k, rowclass=rowclass, side=side))
    return best


def _fit_rc(ys: list[np.ndarray], core: Core, col: _Spec, model: str = "rc") -> _Spec:
    param = col.param
    cache = TableCache(param, core.clo, core.chi, core.esc)
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


def _read_stream(br: BitReader, max_len: int) -> tuple[int, int, int, int, int, np.ndarray | None]:
    kind = br.bits(2)
    lag = br.eg() if kind else 0
    anchor = br.se() if kind else 0
    base = br.se()
    length = br.eg()
    span = br.eg()
    if kind > 2 or length > max_len or span > (1 << 24):
        raise ArtifactError("side information is corrupt (stream header)")
    table = read_table(br, span + 1) if span else None
    if table is not None and not table.any():
        raise ArtifactError("side information is corrupt (empty table)")
    return kind, lag, anchor, base, length, table


def _pred_streams(preds: list[RowPred]) -> list[np.ndarray]:
    return [_cat([p.mode for p in preds]), _cat([p.gidx for p in preds]), _cat([p.coef for p in preds])]


def _roff_sizes(modes: list[np.ndarray]) -> np.ndarray:
    """Alphabet size (row index r) of every coded row offset, tensor by tensor."""
    return _cat([np.flatnonzero(m == MODE_ROW) for m in modes])


# ---------------------------------------------------------------------------------------------
# Coding


def _categorical(weights: np.ndarray) -> constriction.stream.model.Categorical:
    p = effective_probs(weights)[0]
    if p.size == 1:
        p = np.array([1.0, 0.0])
    return constriction.stream.model.Categorical(p, perfect=False)


def _flat_ctx(ctx: list[np.ndarray], shapes: list[tuple[int, int]]) -> np.ndarray:
    return _cat([np.broadcast_to(c, s).ravel() for c, s in zip(ctx, shapes)])


def _sort_order(flat_ctx: np.ndarray, k: int) -> np.ndarray:
    # Stable radix sort on 16-bit keys is several times faster than a comparison sort.
    key = flat_ctx.astype(np.uint16) if k <= 1 << 16 else flat_ctx
    return np.argsort(key, kind="stable")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ArtifactError("entropy buffer is truncated (varint)")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


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
                    b, _ = _escape_parts(vals[esc], self.core)
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
                b, _ = _escape_parts(v[esc], self.core)
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
        order = self._order()
        fy = _cat([y.ravel() for y in self.vys])[order]
        vals = _cat([(self.coded[t] if idx is None else self.coded[t][idx]).ravel() for t, idx in self.layout])[order]
        return _escape_parts(vals[fy >= self.core.ncore], self.core)

    def _bucket_table(self) -> np.ndarray | None:
        e = self._escapes()
        if e is None or e[0].size == 0:
            return None
        return choose_table(np.bincount(e[0], minlength=_BUCKETS))[0]

    def _bucket_costs(self) -> np.ndarray:
        t = self._bucket_table()
        return np.full(_BUCKETS, 8.0) if t is None else cost_bits(t)[0]

    def _order(self) -> np.ndarray:
        return _sort_order(_flat_ctx(self.vctx, self._vshapes()), self.weights.shape[0])

    def _assemble(self) -> tuple[bytes, bytes, list[_Segment]]:
        """Header bits, escape mantissa bytes and the ANS segments in decode order."""
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
        order = self._order()
        fy = _cat([y.ravel() for y in self.vys])[order]
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
                esc_bytes = _pack_mantissas(buckets, mant)
        return bw.getvalue(), esc_bytes, segs

    def bits(self) -> float:
        """Predicted size of ``encode()`` in bits (exact side information, ideal ANS rate)."""
        side, esc, segs = self._assemble()
        ans = sum(s.bits() for s in segs)
        ans_bytes = 4 * int(np.ceil(ans / 32.0)) if ans > 0 else 0
        payload = len(_varint(len(side))) + len(side) + len(_varint(len(esc))) + len(esc) + ans_bytes
        return 8.0 * (len(MAGIC) + 2 + len(_varint(payload)) + 4 + payload)

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


def _make(spec: _Spec, core: Core, lo: int, hi: int, coded: list[np.ndarray]) -> EntropyModel:
    shapes = [m.shape for m in coded]
    layout = _layout(shapes, spec.rowclass, spec.nclass)
    vys = [_to_alphabet(m, core) for m in _vsplit(coded, layout)]
    vctx, weights = _build(spec, [y.shape for y in vys], core)
    return EntropyModel(spec, core, lo, hi, shapes, coded, layout, vys, vctx, weights)


# In ``auto`` the ref model is fitted only when one earlier row would profitably predict this
# share of rows. On the bench checkpoint the int6 groups score 0.00-0.21 and ref never beat
# col/rc there; the embedding scores 0.88 and ref wins.
AUTO_REF_MIN_SHARE = 0.25


def _fit_ref(mats: list[np.ndarray], lo: int, hi: int, min_share: float = 0.0) -> EntropyModel | None:
    if min_share > 0:
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
    return _make(spec, core, lo, hi, res)


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
        out[name] = _make(spec, core, lo, hi, mats)
    return [out[m] for m in models if m in out]


def fit_model(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> EntropyModel:
    """The fitted model ``entropy_encode`` would use (for ``auto``: the smallest coded size)."""
    if model == "auto":
        fits = fit_models(arrays, lo, hi, auto=True)
        sizes = [len(f.encode()) for f in fits]
        return fits[int(np.argmin(sizes))]
    return fit_models(arrays, lo, hi, [model])[0]


def entropy_encode(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> bytes:
    """Self-describing, deterministic bytes for a group of integer arrays with symbols in [lo, hi]."""
    if model == "auto":
        return min((f.encode() for f in fit_models(arrays, lo, hi, auto=True)), key=len)
    return fit_model(arrays, lo, hi, model).encode()


def estimate_bits(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> float:
    """Predicted size in bits of ``entropy_encode(arrays, lo, hi, model)``."""
    if model == "auto":
        return min(f.bits() for f in fit_models(arrays, lo, hi, auto=True))
    return fit_model(arrays, lo, hi, model).bits()


# ---------------------------------------------------------------------------------------------
# Decoding


def _parse(buf: bytes) -> tuple[str, bytes]:
    buf = bytes(buf)
    if len(buf) < len(MAGIC) + 2 or buf[: len(MAGIC)] != MAGIC:
        raise ArtifactError("not an entropy-coded group (bad magic)")
    if buf[3] != VERSION:
        raise ArtifactError(f"entropy format version {buf[3]} is not supported (expected {VERSION})")
    if buf[4] >= len(MODELS):
        raise ArtifactError(f"unknown entropy model id {buf[4]}")
    plen, pos = _read_varint(buf, 5)
    if len(buf) != pos + 4 + plen:
        raise ArtifactError(f"entropy buffer is {len(buf)} bytes, its header says {pos + 4 + plen} (truncated or padded)")
    (crc,) = struct.unpack_from("<I", buf, pos)
    payload = buf[pos + 4:]
    if zlib.crc32(payload) != crc:
        raise ArtifactError("entropy buffer is corrupt (CRC32 mismatch)")
    return MODELS[buf[4]], payload


def entropy_decode(buf: bytes, shapes: Sequence[tuple], dtypes: Sequence[str], lo: int, hi: int) -> list[np.ndarray]:
    """Inverse of :func:`entropy_encode`; raises :class:`ArtifactError` on corrupt input."""
    lo, hi = _check_range(lo, hi)
    if len(shapes) != len(dtypes):
        raise ValueError("shapes and dtypes must have the same length")
    model, payload = _parse(buf)
    try:
        return _decode_payload(model, payload, [tuple(s) for s in shapes], list(dtypes), lo, hi)
    except ArtifactError:
        raise
    except (ValueError, IndexError, OverflowError, MemoryError, TypeError) as e:
        raise ArtifactError(f"entropy buffer is corrupt ({e})") from None


class _Decoder:
    def __init__(self, words: bytes):
        arr = np.frombuffer(words, dtype="<u4").astype(np.uint32)
        self.coder = constriction.stream.stack.AnsCoder(arr) if arr.size else constriction.stream.stack.AnsCoder()

    def cat(self, table: np.ndarray, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, np.int64)
        return self.coder.decode(_categorical(np.atleast_2d(table).astype(np.float64)), count).astype(np.int64)

    def stream(self, kind: int, lag: int, anchor: int, base: int, length: int, table: np.ndarray | None) -> np.ndarray:
        d = np.full(length, base, np.int64) if table is None else self.cat(table, length) + base
        return _untransform(kind, lag, anchor, d)


def _decode_payload(model: str, payload: bytes, shapes: list[tuple], dtypes: list[str], lo: int, hi: int) -> list[np.ndarray]:
    shapes2 = [_shape2d(s) for s in shapes]
    rows = sum(r for r, _ in shapes2)
    slen, pos = _read_varint(payload, 0)
    side = payload[pos:pos + slen]
    pos += slen
    elen, pos = _read_varint(payload, pos)
    esc_data = payload[pos:pos + elen]
    pos += elen
    words = payload[pos:]
    if len(side) != slen or len(esc_data) != elen or len(words) % 4:
        raise ArtifactError("entropy buffer is truncated (section lengths)")

    br = BitReader(side, ArtifactError)
    if br.eg() != len(shapes2):
        raise ArtifactError("buffer holds a different number of tensors than requested")
    if br.eg() != sum(r * c for r, c in shapes2):
        raise ArtifactError("buffer holds a different number of symbols than the given shapes")
    dlo, dhi = _residual_range(lo, hi) if model == "ref" else (lo, hi)
    clo = dlo + br.eg()
    ncore = br.eg() + 1
    if ncore > MAX_CORE or clo + ncore - 1 > dhi:
        raise ArtifactError("side information is corrupt (core window)")
    core = Core(clo, clo + ncore - 1, bool(br.bits(1)))
    spec = _Spec(model)
    if model == "hist":
        layout = _layout(shapes2, None, 1)
        spec.tables = [read_table(br, core.n) for _ in layout]
        if any(not t.any() for t in spec.tables):
            raise ArtifactError("side information is corrupt (empty table)")
    else:
        fam, q, m, nclass = br.bits(1), br.bits(5), br.bits(4), br.bits(2) + 1
        if q == 0 or nclass > MAX_CLASSES:
            raise ArtifactError("side information is corrupt (model parameters)")
        spec.param, spec.nclass = Param(FAMILIES[fam], q, m), nclass
    n_streams = {"hist": 0, "col": 2, "row": 2, "rc": 3, "ref": 6}[model] + (spec.nclass > 1)
    heads = [_read_stream(br, max(rows, sum(c for _, c in shapes2)) * MAX_CLASSES) for _ in range(n_streams)]
    bucket_table = None
    if core.esc and br.bits(1):
        bucket_table = read_table(br, _BUCKETS)
        if not bucket_table.any():
            raise ArtifactError("side information is corrupt (empty escape table)")

    dec = _Decoder(words)
    heads = list(heads)
    if model == "ref":
        mode = dec.stream(*heads.pop(0))
        gidx = dec.stream(*heads.pop(0))
        coef = dec.stream(*heads.pop(0))
        if len(mode) != rows:
            raise ArtifactError("side information is corrupt (row modes)")
        modes = _split(mode, [r for r, _ in shapes2])
        sizes = _roff_sizes(modes)
        roff = np.zeros(len(sizes), np.int64)
        keep = sizes >= 2
        if keep.any():
            roff[keep] = dec.coder.decode(constriction.stream.model.Uniform(), sizes[keep].astype(np.int32)).astype(np.int64)
        n_g = [int((m_ == MODE_GROUP).sum()) for m_ in modes]
        n_c = [int((m_ != 0).sum()) for m_ in modes]
        n_r = [int((m_ == MODE_ROW).sum()) for m_ in modes]
        if sum(n_g) != len(gidx) or sum(n_c) != len(coef):
            raise ArtifactError("side information is corrupt (row predictions)")
        spec.pred = [RowPred(a, b, c, d) for a, b, c, d in zip(modes, _split(gidx, n_g), _split(roff, n_r), _split(coef, n_c))]
    if spec.nclass > 1:
        spec.rowclass = dec.stream(*heads.pop(0))
        if len(spec.rowclass) != rows or spec.rowclass.min(initial=0) < 0 or spec.rowclass.max(initial=0) >= spec.nclass:
            raise ArtifactError("side information is corrupt (row classes)")
    layout = _layout(shapes2, spec.rowclass, spec.nclass)
    vsh = _vshapes(layout, shapes2)
    expect = _stream_lengths(spec, vsh)
    spec.side = [dec.stream(*h) for h in heads]
    if [len(s) for s in spec.side] != expect:
        raise ArtifactError("side information is corrupt (stream lengths)")

    vctx, weights = _build(spec, vsh, core)
    fc = _flat_ctx(vctx, vsh)
    k = weights.shape[0]
    order = _sort_order(fc, k)
    counts = np.bincount(fc, minlength=k) if fc.size else np.zeros(k, np.int64)
    parts = [dec.cat(weights[j], int(counts[j])) for j in range(k) if counts[j]]
    ys_sorted = _cat(parts)
    v_sorted = ys_sorted + core.clo
    if core.esc:
        esc = ys_sorted >= core.ncore
        if esc.any():
            if bucket_table is None:
                raise ArtifactError("entropy buffer is corrupt (escapes without an escape table)")
            buckets = dec.cat(bucket_table, int(esc.sum()))
            w = (np.int64(1) << buckets) + _unpack_mantissas(esc_data, buckets)
            v_sorted[esc] = np.where(ys_sorted[esc] == core.ncore, core.clo - w, core.chi + w)
    if not dec.coder.is_empty():
        raise ArtifactError("entropy buffer is corrupt (ANS stream has leftover data)")
    flat = np.empty_like(v_sorted)
    flat[order] = v_sorted
    vparts = [p.reshape(s) for p, s in zip(_split(flat, [r * c for r, c in vsh]), vsh)]
    mats = _vmerge(vparts, layout, shapes2, np.int64)
    if model == "ref":
        mats = [run_row_prediction(m_, p, decode=True) for m_, p in zip(mats, spec.pred)]
    out = []
    for m_, shape, dt in zip(mats, shapes, dtypes):
        if m_.size and (m_.min() < lo or m_.max() > hi):
            raise ArtifactError("entropy buffer is corrupt (decoded symbols outside the declared range)")
        out.append(m_.astype(np.dtype(dt)).reshape(shape))
    return out
