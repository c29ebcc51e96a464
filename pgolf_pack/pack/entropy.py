"""Model-based entropy coding of one group of integer symbol matrices (ANS via ``constriction``).

A group (e.g. the ``mlp.fc`` symbols of every layer) is coded with one of four models, each a set
of contexts with a probability table per context:

* ``hist`` – one exact-histogram table per tensor (counts quantized, stored in the header);
* ``col``  – per-column (input feature) discretized Gaussian/Laplace: a scale index per column
  on a log grid (and optionally a mean index); tables are computed from the indices, never stored;
* ``row``  – the same per row;
* ``rc``   – scale index of row r plus that of column c (a product of scales).

``auto`` codes with every model and keeps the shortest. Values outside a core window of at most
``MAX_CORE`` symbols become escape symbols whose magnitudes follow as Elias-gamma-style buckets
(ANS-coded) and raw mantissa bits, so wide (int16/int32) ranges stay cheap and exact.

Buffer: ``PGE`` + version + model id, varint payload length, CRC32 of the payload; payload =
side-information bits (core, model parameters, count tables), escape mantissas, ANS words.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import constriction
import numpy as np

from ..errors import ArtifactError
from .entropy_models import (
    FAMILIES,
    BitReader,
    BitWriter,
    Param,
    TableCache,
    axis_hists,
    choose_table,
    cost_bits,
    dense_codes,
    effective_probs,
    fit_lines,
    pair_codes,
    read_table,
    write_table,
)

MAGIC = b"PGE"
VERSION = 1
MODELS = ("hist", "col", "row", "rc")
_MODEL_ID = {m: i for i, m in enumerate(MODELS)}
MAX_CORE = 1024
# |value| < 2**31, so an escape distance + 1 is below 2**33: buckets 0..32.
_BUCKETS = 33
_Q_MAX = 31
_M_MAX = 15
_SCALE_LIMITS = (-6, 24)  # scale grid spans 2**-6 .. 2**24 symbols
_DTYPES = ("int8", "uint8", "int16", "uint16", "int32")


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


def _choose_core(mats: list[np.ndarray], lo: int, hi: int) -> Core:
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
    w = 4
    while 2 * w + 1 <= MAX_CORE:
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
        w *= 2
    return Core(best[1], best[2], True)


def _to_alphabet(m: np.ndarray, core: Core) -> np.ndarray:
    y = m - core.clo
    if core.esc:
        y = np.where(m < core.clo, core.ncore, np.where(m > core.chi, core.ncore + 1, y))
    return y.astype(np.int32)


def _escape_parts(v: np.ndarray, core: Core) -> tuple[np.ndarray, np.ndarray]:
    """Bucket (bit length - 1 of distance + 1) and mantissa of escaped values."""
    d = np.where(v < core.clo, core.clo - 1 - v, v - core.chi - 1).astype(np.int64)
    w = d + 1
    b = np.floor(np.log2(w.astype(np.float64))).astype(np.int64)
    b = np.where((w >> b) == 0, b - 1, b)
    b = np.where((w >> (b + 1)) > 0, b + 1, b)
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
    if not parts:
        return b""
    return np.packbits(np.concatenate(parts)).tobytes()


def _unpack_mantissas(data: bytes, buckets: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    order = np.argsort(buckets, kind="stable")
    b = buckets[order]
    mant_sorted = np.zeros(len(b), dtype=np.int64)
    pos = 0
    for k in np.unique(b):
        sel = np.flatnonzero(b == k)
        if k == 0:
            continue
        need = len(sel) * int(k)
        if pos + need > len(bits):
            raise ArtifactError("escape mantissas are truncated")
        chunk = bits[pos:pos + need].reshape(len(sel), int(k)).astype(np.int64)
        mant_sorted[sel] = chunk @ (np.int64(1) << np.arange(k - 1, -1, -1, dtype=np.int64))
        pos += need
    if (len(bits) - pos) >= 8:
        raise ArtifactError("escape section has trailing bytes")
    mant = np.empty_like(mant_sorted)
    mant[order] = mant_sorted
    return mant


# ---------------------------------------------------------------------------------------------
# Models: fit (encoder only) and build (shared by encoder and decoder)


@dataclass
class _Spec:
    """What the header carries for a model: parameters plus integer side streams."""

    model: str
    param: Param | None
    tables: list[np.ndarray | None] | None  # hist: one quantized table per tensor
    side: list[np.ndarray]  # integer streams coded in ANS ahead of the symbols


def _side_lengths(model: str, shapes: list[tuple[int, int]]) -> list[int]:
    rows = sum(r for r, _ in shapes)
    cols = sum(c for _, c in shapes)
    if model == "col":
        return [cols, cols]
    if model == "row":
        return [rows, rows]
    if model == "rc":
        return [rows, cols]
    return []


def _split(a: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1]) if sizes else []


def _build(spec: _Spec, shapes: list[tuple[int, int]], core: Core) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-tensor context maps (broadcastable to the tensor) and the (K, n) weight table."""
    n = core.n
    if spec.model == "hist":
        ctx, tabs = [], []
        for t in spec.tables:
            if t is None:
                ctx.append(np.zeros((1, 1), np.int64))
            else:
                ctx.append(np.full((1, 1), len(tabs), np.int64))
                tabs.append(t.astype(np.float64))
        w = np.stack(tabs) if tabs else np.ones((1, n))
        return ctx, w
    cache = TableCache(spec.param, core.clo, core.chi, core.esc)
    if spec.model in ("col", "row"):
        sizes = [c for _, c in shapes] if spec.model == "col" else [r for r, _ in shapes]
        keys = np.stack([spec.side[0], spec.side[1]], axis=1)
        if len(keys) == 0:
            return [np.zeros((1, 1), np.int64) for _ in shapes], np.ones((1, n))
        uniq, inv = pair_codes(keys)
        ctx = [p[None, :] if spec.model == "col" else p[:, None] for p in _split(inv, sizes)]
        return ctx, cache.weights(uniq)
    # rc: class scale index u[r] + v[c]
    us = _split(spec.side[0], [r for r, _ in shapes])
    vs = _split(spec.side[1], [c for _, c in shapes])
    sums = [u[:, None] + v[None, :] for u, v in zip(us, vs)]
    allk = np.concatenate([s.ravel() for s in sums]) if sums else np.zeros(0, np.int64)
    if allk.size == 0:
        return [np.zeros((1, 1), np.int64) for _ in shapes], np.ones((1, n))
    uniq, inv = dense_codes(allk)
    ctx = [p.reshape(s.shape) for p, s in zip(_split(inv, [s.size for s in sums]), sums)]
    keys = np.stack([uniq, np.zeros_like(uniq)], axis=1)
    return ctx, cache.weights(keys)


def _stream_bits(x: np.ndarray) -> float:
    if x.size == 0 or x.min() == x.max():
        return 16.0
    _, bits = choose_table(np.bincount(x - x.min()))
    return bits + 24.0


def _fit_hist(ys: list[np.ndarray], core: Core) -> _Spec:
    tables = []
    for y in ys:
        tables.append(choose_table(np.bincount(y.ravel(), minlength=core.n))[0] if y.size else None)
    return _Spec("hist", None, tables, [])


def _fit_lines_model(ys: list[np.ndarray], core: Core, model: str) -> _Spec:
    axis = 1 if model == "col" else 0
    hists = axis_hists(ys, core.n, axis)
    values = core.values()

    def run(param: Param) -> tuple[float, list[np.ndarray]]:
        cache = TableCache(param, core.clo, core.chi, core.esc)
        rng = (_SCALE_LIMITS[0] * param.q, _SCALE_LIMITS[1] * param.q)
        s, m, cost = fit_lines(hists, None, cache, values, rng)
        s_all = np.concatenate(s) if s else np.zeros(0, np.int64)
        m_all = np.concatenate(m) if m else np.zeros(0, np.int64)
        return cost + _stream_bits(s_all) + _stream_bits(m_all), [s_all, m_all]

    best = min(((run(Param(f, 8, 0)), Param(f, 8, 0)) for f in FAMILIES), key=lambda r: r[0][0])
    for q in (4, 6, 12, 16):
        p = Param(best[1].family, q, 0)
        r = run(p)
        if r[0] < best[0][0]:
            best = (r, p)
    for mstep in (2, 4, 8):
        p = Param(best[1].family, best[1].q, mstep)
        r = run(p)
        if r[0] < best[0][0]:
            best = (r, p)
    return _Spec(model, best[1], None, best[0][1])


def _grouped_hists(y: np.ndarray, idx: np.ndarray, n: int, axis: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Line histograms along ``axis`` (1: per column) split by the other axis' index value."""
    groups, offs = [], np.unique(idx)
    for g in offs:
        sub = y[idx == g, :] if axis == 1 else y[:, idx == g]
        groups.append(axis_hists([sub], n, axis)[0])
    return groups, offs


def _fit_rc(ys: list[np.ndarray], core: Core, col: _Spec) -> _Spec:
    param = Param(col.param.family, col.param.q, 0)
    cache = TableCache(param, core.clo, core.chi, core.esc)
    rng = (_SCALE_LIMITS[0] * param.q, _SCALE_LIMITS[1] * param.q)
    values = core.values()
    vs = _split(col.side[0], [y.shape[1] for y in ys])
    us = [np.zeros(y.shape[0], np.int64) for y in ys]
    for _ in range(2):
        hr = [_grouped_hists(y, v, core.n, 0) for y, v in zip(ys, vs)]
        us, _, _ = fit_lines([h for h, _ in hr], [o for _, o in hr], cache, values, rng, init=us)
        hc = [_grouped_hists(y, u, core.n, 1) for y, u in zip(ys, us)]
        vs, _, _ = fit_lines([h for h, _ in hc], [o for _, o in hc], cache, values, rng, init=vs)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return _Spec("rc", param, None, [cat(us), cat(vs)])


# ---------------------------------------------------------------------------------------------
# Header (side information)


def _write_side_streams(bw: BitWriter, side: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    coded = []
    for x in side:
        x = np.asarray(x, dtype=np.int64)
        base = int(x.min()) if x.size else 0
        span = int(x.max()) - base if x.size else 0
        bw.se(base)
        bw.eg(span)
        if span:
            table, _ = choose_table(np.bincount(x - base, minlength=span + 1))
            write_table(bw, table)
            coded.append((x - base, table))
        else:
            coded.append((x - base, None))
    return coded


def _read_side_streams(br: BitReader, lengths: list[int]) -> list[tuple[int, int, np.ndarray | None]]:
    out = []
    for ln in lengths:
        base = br.se()
        span = br.eg()
        if span > (1 << 32):
            raise ArtifactError("side information is corrupt (stream span)")
        table = read_table(br, span + 1) if span else None
        if table is not None and ln and not table.any():
            raise ArtifactError("side information is corrupt (empty table)")
        out.append((base, ln, table))
    return out


def _write_header(bw: BitWriter, spec: _Spec, core: Core, lo: int, nsym: int, ntensors: int) -> None:
    bw.eg(ntensors)
    bw.eg(nsym)
    bw.eg(core.clo - lo)
    bw.eg(core.ncore - 1)
    bw.bits(int(core.esc), 1)
    if spec.model == "hist":
        for t in spec.tables:
            if t is not None:
                write_table(bw, t)
    else:
        p = spec.param
        bw.bits(FAMILIES.index(p.family), 1)
        bw.bits(p.q, 5)
        bw.bits(p.m, 4)


def _read_header(br: BitReader, model: str, shapes: list[tuple[int, int]], lo: int, hi: int) -> tuple[Core, Param | None, list | None]:
    if br.eg() != len(shapes):
        raise ArtifactError("buffer holds a different number of tensors than requested")
    if br.eg() != sum(r * c for r, c in shapes):
        raise ArtifactError("buffer holds a different number of symbols than the given shapes")
    clo = lo + br.eg()
    ncore = br.eg() + 1
    if ncore > MAX_CORE or clo + ncore - 1 > hi:
        raise ArtifactError("side information is corrupt (core window)")
    core = Core(clo, clo + ncore - 1, bool(br.bits(1)))
    if model == "hist":
        tables = [read_table(br, core.n) if r * c else None for r, c in shapes]
        if any(t is not None and not t.any() for t in tables):
            raise ArtifactError("side information is corrupt (empty table)")
        return core, None, tables
    fam = br.bits(1)
    q, m = br.bits(5), br.bits(4)
    if q == 0:
        raise ArtifactError("side information is corrupt (scale grid)")
    return core, Param(FAMILIES[fam], q, m), None


# ---------------------------------------------------------------------------------------------
# Coding


def _categorical(weights: np.ndarray) -> constriction.stream.model.Categorical:
    p = effective_probs(weights)[0]
    if p.size == 1:
        p = np.array([1.0, 0.0])
    return constriction.stream.model.Categorical(p, perfect=False)


def _flat_ctx(ctx: list[np.ndarray], shapes: list[tuple[int, int]]) -> np.ndarray:
    parts = [np.broadcast_to(c, s).ravel() for c, s in zip(ctx, shapes)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _sort_key(flat_ctx: np.ndarray, k: int) -> np.ndarray:
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
class EntropyModel:
    """A fitted model of one group: predicted size, per-symbol costs and the encoder."""

    spec: _Spec
    core: Core
    lo: int
    hi: int
    shapes: list[tuple[int, int]]
    ys: list[np.ndarray]
    vals: list[np.ndarray]
    ctx: list[np.ndarray]
    weights: np.ndarray

    @property
    def model(self) -> str:
        return self.spec.model

    def _costs(self) -> np.ndarray:
        return cost_bits(self.weights)

    def symbol_bits(self, t: int) -> np.ndarray:
        """Bits spent on each symbol of tensor ``t`` (escape magnitudes included), side info excluded."""
        c = self._costs()[np.broadcast_to(self.ctx[t], self.shapes[t]), self.ys[t]]
        if self.core.esc:
            esc = self.ys[t] >= self.core.ncore
            if esc.any():
                b, _ = _escape_parts(self.vals[t][esc], self.core)
                c = c.copy()
                c[esc] += self._bucket_costs()[b] + b
        return c

    def value_costs(self, t: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ctx, costs): coding value ``values[j]`` at (r, c) of tensor t costs ``costs[ctx[r, c], j]`` bits.

        ``ctx`` broadcasts to the tensor's 2-D shape. Meant for rate-distortion quantizers, which
        hold the model fixed while choosing symbols.
        """
        v = np.asarray(values, dtype=np.int64)
        y = _to_alphabet(np.clip(v, self.lo, self.hi), self.core)
        costs = self._costs()[:, y]
        if self.core.esc:
            esc = y >= self.core.ncore
            if esc.any():
                b, _ = _escape_parts(v[esc], self.core)
                costs[:, esc] += (np.minimum(self._bucket_costs()[np.minimum(b, _BUCKETS - 1)], 40.0) + b)[None, :]
        return self.ctx[t], costs

    def _bucket_costs(self) -> np.ndarray:
        table = self._bucket_table()
        if table is None:
            return np.full(_BUCKETS, 8.0)
        return cost_bits(table)[0]

    def _bucket_table(self) -> np.ndarray | None:
        b = self._escape_buckets()
        if b is None or b.size == 0:
            return None
        return choose_table(np.bincount(b, minlength=_BUCKETS))[0]

    def _escape_buckets(self) -> np.ndarray | None:
        if not self.core.esc:
            return None
        esc_vals = [v[y >= self.core.ncore] for v, y in zip(self.vals, self.ys)]
        allv = np.concatenate(esc_vals) if esc_vals else np.zeros(0, np.int64)
        return _escape_parts(allv, self.core)[0]

    def bits(self) -> float:
        """Predicted size of ``encode()`` in bits (within a few bytes)."""
        nbits = 0.0
        fy = np.concatenate([y.ravel() for y in self.ys]) if self.ys else np.zeros(0, np.int32)
        fc = _flat_ctx(self.ctx, self.shapes)
        if fy.size:
            counts = np.bincount(fc * self.core.n + fy, minlength=self.weights.shape[0] * self.core.n)
            nbits += float((counts.reshape(-1, self.core.n) * self._costs()).sum())
        bw = BitWriter()
        _write_header(bw, self.spec, self.core, self.lo, int(fy.size), len(self.shapes))
        esc_bytes = 0
        b = self._escape_buckets()
        if b is not None:
            bw.bits(int(b.size > 0), 1)
            if b.size:
                table = self._bucket_table()
                write_table(bw, table)
                nbits += float((np.bincount(b, minlength=_BUCKETS) * cost_bits(table)[0]).sum())
                esc_bytes = (int(b.sum()) + 7) // 8
        for x, table in _write_side_streams(bw, self.spec.side):
            if table is not None:
                nbits += float(cost_bits(table)[0][x].sum())
        side = len(bw.getvalue())
        ans_bytes = 4 * int(np.ceil(nbits / 32.0)) if nbits > 0 else 0
        payload = side + esc_bytes + ans_bytes + len(_varint(side)) + len(_varint(esc_bytes))
        return 8.0 * (len(MAGIC) + 2 + len(_varint(payload)) + 4 + payload)

    def encode(self) -> bytes:
        bw = BitWriter()
        fy = np.concatenate([y.ravel() for y in self.ys]) if self.ys else np.zeros(0, np.int32)
        fv = np.concatenate([v.ravel() for v in self.vals]) if self.vals else np.zeros(0, np.int64)
        _write_header(bw, self.spec, self.core, self.lo, int(fy.size), len(self.shapes))
        k = self.weights.shape[0]
        order = _sort_key(_flat_ctx(self.ctx, self.shapes), k)
        ys_sorted = fy[order]
        counts = np.bincount(_flat_ctx(self.ctx, self.shapes), minlength=k) if fy.size else np.zeros(k, np.int64)
        coder = constriction.stream.stack.AnsCoder()
        esc_bytes = b""
        if self.core.esc:
            esc_pos = ys_sorted >= self.core.ncore
            bw.bits(int(esc_pos.any()), 1)
            if esc_pos.any():
                buckets, mant = _escape_parts(fv[order][esc_pos], self.core)
                table = choose_table(np.bincount(buckets, minlength=_BUCKETS))[0]
                write_table(bw, table)
                coder.encode_reverse(buckets.astype(np.int32), _categorical(table))
                esc_bytes = _pack_mantissas(buckets, mant)
        coded_side = _write_side_streams(bw, self.spec.side)
        ends = np.cumsum(counts)
        for j in range(k - 1, -1, -1):
            if counts[j]:
                coder.encode_reverse(ys_sorted[ends[j] - counts[j]:ends[j]], _categorical(self.weights[j]))
        for x, table in reversed(coded_side):
            if table is not None and x.size:
                coder.encode_reverse(x.astype(np.int32), _categorical(table))
        side = bw.getvalue()
        ans = coder.get_compressed().astype("<u4").tobytes()
        payload = _varint(len(side)) + side + _varint(len(esc_bytes)) + esc_bytes + ans
        head = MAGIC + bytes([VERSION, _MODEL_ID[self.spec.model]]) + _varint(len(payload))
        return head + struct.pack("<I", zlib.crc32(payload)) + payload


def _make(spec: _Spec, core: Core, lo: int, hi: int, mats: list[np.ndarray], ys: list[np.ndarray]) -> EntropyModel:
    shapes = [m.shape for m in mats]
    ctx, weights = _build(spec, shapes, core)
    return EntropyModel(spec, core, lo, hi, shapes, ys, mats, ctx, weights)


def fit_models(arrays: Sequence[np.ndarray], lo: int, hi: int, models: Sequence[str] = MODELS) -> list[EntropyModel]:
    """Fit each requested model to the group (encoder side)."""
    lo, hi = _check_range(lo, hi)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown entropy model {unknown[0]!r}; choose from {', '.join(MODELS)} or auto")
    mats = _prepare(arrays, lo, hi)
    core = _choose_core(mats, lo, hi)
    ys = [_to_alphabet(m, core) for m in mats]
    out: dict[str, EntropyModel] = {}
    col = None
    for name in models:
        if name == "hist":
            spec = _fit_hist(ys, core)
        elif name in ("col", "row"):
            spec = _fit_lines_model(ys, core, name)
        else:
            col = col if col is not None else _fit_lines_model(ys, core, "col")
            spec = _fit_rc(ys, core, col)
        if name == "col":
            col = spec
        out[name] = _make(spec, core, lo, hi, mats, ys)
    return [out[m] for m in models]


def fit_model(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> EntropyModel:
    """The fitted model ``entropy_encode`` would use (for ``auto``: the smallest coded size)."""
    if model == "auto":
        fits = fit_models(arrays, lo, hi)
        sizes = [len(f.encode()) for f in fits]
        return fits[int(np.argmin(sizes))]
    return fit_models(arrays, lo, hi, [model])[0]


def entropy_encode(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> bytes:
    """Self-describing, deterministic bytes for a group of integer arrays with symbols in [lo, hi]."""
    if model == "auto":
        outs = [f.encode() for f in fit_models(arrays, lo, hi)]
        return min(outs, key=len)
    return fit_model(arrays, lo, hi, model).encode()


def estimate_bits(arrays: Sequence[np.ndarray], lo: int, hi: int, model: str = "auto") -> float:
    """Predicted size in bits of ``entropy_encode(arrays, lo, hi, model)``."""
    if model == "auto":
        return min(f.bits() for f in fit_models(arrays, lo, hi))
    return fit_model(arrays, lo, hi, model).bits()


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
        raise ArtifactError(f"entropy buffer is {len(buf)} bytes, header says {pos + 4 + plen} (truncated or padded)")
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
    except (ValueError, IndexError, OverflowError, MemoryError) as e:
        raise ArtifactError(f"entropy buffer is corrupt ({e})") from None


def _decode_payload(model: str, payload: bytes, shapes: list[tuple], dtypes: list[str], lo: int, hi: int) -> list[np.ndarray]:
    shapes2 = [_shape2d(s) for s in shapes]
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
    core, param, tables = _read_header(br, model, shapes2, lo, hi)
    bucket_table = None
    if core.esc and br.bits(1):
        bucket_table = read_table(br, _BUCKETS)
        if not bucket_table.any():
            raise ArtifactError("side information is corrupt (empty escape table)")
    streams = _read_side_streams(br, _side_lengths(model, shapes2))
    arr = np.frombuffer(words, dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(arr) if arr.size else constriction.stream.stack.AnsCoder()
    side_vals = []
    for base, ln, table in streams:
        if table is None or ln == 0:
            side_vals.append(np.full(ln, base, np.int64))
        else:
            side_vals.append(coder.decode(_categorical(table), ln).astype(np.int64) + base)
    spec = _Spec(model, param, tables, side_vals)
    ctx, weights = _build(spec, shapes2, core)
    fc = _flat_ctx(ctx, shapes2)
    k = weights.shape[0]
    order = _sort_key(fc, k)
    counts = np.bincount(fc, minlength=k) if fc.size else np.zeros(k, np.int64)
    parts = [coder.decode(_categorical(weights[j]), int(counts[j])) for j in range(k) if counts[j]]
    ys_sorted = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    v_sorted = ys_sorted + core.clo
    if core.esc:
        esc = ys_sorted >= core.ncore
        if esc.any():
            if bucket_table is None:
                raise ArtifactError("entropy buffer is corrupt (escapes without an escape table)")
            buckets = coder.decode(_categorical(bucket_table), int(esc.sum())).astype(np.int64)
            mant = _unpack_mantissas(esc_data, buckets)
            d = (np.int64(1) << buckets) + mant - 1
            below = ys_sorted[esc] == core.ncore
            v_sorted[esc] = np.where(below, core.clo - 1 - d, core.chi + 1 + d)
    if not coder.is_empty():
        raise ArtifactError("entropy buffer is corrupt (ANS stream has leftover data)")
    flat = np.empty_like(v_sorted)
    flat[order] = v_sorted
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ArtifactError("entropy buffer is corrupt (decoded symbols outside the declared range)")
    out = []
    for piece, shape, dt in zip(_split(flat, [r * c for r, c in shapes2]), shapes, dtypes):
        out.append(piece.astype(np.dtype(dt)).reshape(shape))
    return out
