"""Decoding of the model-based entropy codec (ANS via ``constriction``): the format, read side.

What a decoder needs and nothing more: the buffer's container (magic, version, model id, varint
length, CRC32), the side-information streams, the probability tables rebuilt from the stored
parameters (:mod:`.entropy_tables`), and the ANS decode. It imports nothing from the encoder
(:mod:`.entropy`, :mod:`.entropy_models`); the format itself is described in :mod:`.entropy`.

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
from .entropy_tables import (
    FAMILIES,
    MODE_GROUP,
    MODE_ROW,
    PRED_DEN,
    PRED_KMAX,
    BitReader,
    Param,
    RowPred,
    TableCache,
    dense_codes,
    effective_probs,
    pair_codes,
    param_tables,
    read_table,
    run_row_prediction,
)

MAGIC = b"PGE"
VERSION = 1
MODELS = ("hist", "col", "row", "rc", "ref")
_MODEL_ID = {m: i for i, m in enumerate(MODELS)}
MAX_CORE = 1024
MAX_CLASSES = 3
# |value| < 2**31 and residuals stay below 2**33, so an escape distance + 1 has at most 34 bits.
_BUCKETS = 35
MAX_STREAM_SPAN = 1 << 17
_TABLE_BATCH = 256


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


def _contexts(spec: _Spec, vshapes: list[tuple[int, int]], core: Core) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray | None]:
    """Per-virtual-tensor context maps (broadcastable) and what each context's table is made
    from: (ctx, stored tables (K, n) or None, parametric (s, m) keys (K, 2) or None)."""
    n = core.n
    if not vshapes:
        return [], np.ones((1, n)), None
    if spec.model == "hist":
        return [np.full((1, 1), i, np.int64) for i in range(len(vshapes))], np.stack(spec.tables).astype(np.float64), None
    if spec.model in ("col", "row"):
        sizes = [c for _, c in vshapes] if spec.model == "col" else [r for r, _ in vshapes]
        uniq, inv = pair_codes(np.stack([spec.side[0], spec.side[1]], axis=1))
        ctx = [p[None, :] if spec.model == "col" else p[:, None] for p in _split(inv, sizes)]
        return ctx, None, uniq
    us = _split(spec.side[0], [r for r, _ in vshapes])
    vs = _split(spec.side[1], [c for _, c in vshapes])
    ms = _split(spec.side[2], [c for _, c in vshapes])
    s_lo = min(int(u.min()) for u in us) + min(int(v.min()) for v in vs)
    m_lo = min(int(m.min()) for m in ms)
    m_span = max(int(m.max()) for m in ms) - m_lo + 1
    codes = [((u[:, None] + v[None, :] - s_lo) * m_span + (m - m_lo)[None, :]).ravel() for u, v, m in zip(us, vs, ms)]
    uniq, inv = dense_codes(_cat(codes))
    ctx = [p.reshape(s) for p, s in zip(_split(inv, [r * c for r, c in vshapes]), vshapes)]
    return ctx, None, np.stack([uniq // m_span + s_lo, uniq % m_span + m_lo], axis=1)


def _build(spec: _Spec, vshapes: list[tuple[int, int]], core: Core) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-virtual-tensor context maps (broadcastable) and the whole (K, n) weight table."""
    ctx, tables, keys = _contexts(spec, vshapes, core)
    if tables is not None:
        return ctx, tables
    return ctx, TableCache(spec.param, core.clo, core.chi, core.esc).weights(keys)


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


def _read_stream(br: BitReader, max_len: int) -> tuple[int, int, int, int, int, np.ndarray | None]:
    kind = br.bits(2)
    lag = br.eg() if kind else 0
    anchor = br.se() if kind else 0
    base = br.se()
    length = br.eg()
    span = br.eg()
    # Side values are scale/mean indices (spans below ~2**15 even as deltas) or row indices
    # (below 2 * max_len as deltas); a wider table is a header asking for memory it cannot need.
    if kind > 2 or length > max_len or span > max(MAX_STREAM_SPAN, 2 * max_len + 2):
        raise ArtifactError("side information is corrupt (stream header)")
    table = read_table(br, span + 1) if span else None
    if table is not None and not table.any():
        raise ArtifactError("side information is corrupt (empty table)")
    return kind, lag, anchor, base, length, table


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

    vctx, tables, keys = _contexts(spec, vsh, core)
    fc = _flat_ctx(vctx, vsh)
    k = len(tables) if tables is not None else len(keys)
    order = _sort_order(fc, k)
    counts = np.bincount(fc, minlength=k) if fc.size else np.zeros(k, np.int64)
    parts = []
    # Tables are built a slice of contexts at a time: a header can name up to one context per
    # symbol, and all their tables at once would be symbols x alphabet floats.
    for j0 in range(0, k, _TABLE_BATCH):
        j1 = min(k, j0 + _TABLE_BATCH)
        w = tables[j0:j1] if tables is not None else param_tables(spec.param, core.clo, core.chi, core.esc, keys[j0:j1])
        parts += [dec.cat(w[j - j0], int(counts[j])) for j in range(j0, j1) if counts[j]]
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
