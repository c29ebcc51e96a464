"""Per-row mixed bit widths (scheme "introws"): the rows of one matrix in tiers of different int-k.

Meant for embeddings, whose rows are used in proportion to token frequency: frequent tokens get
more bits, rare ones fewer. A plan such as ``"1024:8,rest:5"`` or ``"5%:8@20,30%:6,rest:5"`` lists
tiers from the most important rows down: a row count, a percentage of the rows or ``rest``, then
the bits and optionally ``@`` the SDClip multiple for that tier.

Storage: one symbols stream per tier (``q.t0``, ``q.t1``, … holding that tier's rows in row order,
so each group coder sees one homogeneous symbol range), fp16 per-row scales in row order (side)
and a tier map (side, uint8) telling each row's tier.

Why a tier map and never a permutation: the decoder only needs *which* rows are in which tier,
not their rank order. Any description of the tiering costs at least log2(multinomial(rows; n_t))
≈ rows·H(tier) bits; a tier id per row at ceil(log2 T) bits is within a small factor of that and
the side codec squeezes it towards it, while a permutation costs rows·log2(rows) bits (1,024
rows: 1,280 B against 128 B for a 2-tier bitmap). When ids are ordered by frequency, as
sentencepiece ids roughly are, tiers come in long runs and a run-length map is smaller still, so
the map is stored as whichever of the two is shorter (``params["tier_map"]``: ``bits`` | ``runs``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ArtifactError, PgolfError
from .base import QuantizedTensor, Stream, register_check, register_scheme
from .spec import Check
from .rtn import choose_scales, dequantize_rows, qmax, quantize_with_scales

SCHEME = "introws"
MAX_TIERS = 16
_TIER_RE = re.compile(r"^\s*(rest|\d+(?:\.\d+)?%|\d+)\s*:\s*(\d+)\s*(?:@\s*(\d+(?:\.\d*)?|\.\d+)\s*)?$")


# --- plans -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierSpec:
    """One tier of a plan: ``count`` rows, or ``percent`` of them, or the rest (both None)."""

    bits: int
    count: int | None = None
    percent: float | None = None
    sigmas: float | None = None

    @property
    def is_rest(self) -> bool:
        return self.count is None and self.percent is None

    def label(self) -> str:
        n = "rest" if self.is_rest else (f"{self.percent:g}%" if self.percent is not None else str(self.count))
        return f"{n}:{self.bits}" + (f"@{self.sigmas:g}" if self.sigmas is not None else "")


def parse_row_bits(plan: str) -> list[TierSpec]:
    """Parse ``"1024:8,rest:5"`` / ``"10%:8@20,rest:6"``; raises PgolfError with the offending part."""
    if not isinstance(plan, str) or not plan.strip():
        raise PgolfError("row_bits plan is empty; expected e.g. '1024:8,rest:5'")
    tiers: list[TierSpec] = []
    for part in plan.split(","):
        m = _TIER_RE.match(part)
        if m is None:
            raise PgolfError(f"row_bits plan {plan!r}: cannot read tier {part.strip()!r}; "
                             "expected COUNT:BITS[@SIGMAS] with COUNT an integer, a percentage or 'rest'")
        n, bits, sig = m.group(1), int(m.group(2)), m.group(3)
        if not 2 <= bits <= 8:
            raise PgolfError(f"row_bits plan {plan!r}: bits must be in 2..8, got {bits}")
        sigmas = float(sig) if sig is not None else None
        if sigmas is not None and sigmas <= 0:
            raise PgolfError(f"row_bits plan {plan!r}: the clip multiple after '@' must be positive")
        if n == "rest":
            tiers.append(TierSpec(bits, sigmas=sigmas))
        elif n.endswith("%"):
            pct = float(n[:-1])
            if not 0 <= pct <= 100:
                raise PgolfError(f"row_bits plan {plan!r}: percentage {n} is not in 0..100%")
            tiers.append(TierSpec(bits, percent=pct, sigmas=sigmas))
        else:
            tiers.append(TierSpec(bits, count=int(n), sigmas=sigmas))
    if sum(t.is_rest for t in tiers) > 1:
        raise PgolfError(f"row_bits plan {plan!r}: 'rest' may appear only once")
    if len(tiers) > MAX_TIERS:
        raise PgolfError(f"row_bits plan {plan!r}: at most {MAX_TIERS} tiers")
    return tiers


def format_row_bits(tiers: Sequence[TierSpec]) -> str:
    return ",".join(t.label() for t in tiers)


def resolve_tiers(tiers: Sequence[TierSpec], rows: int) -> list[int]:
    """Row count of every tier for a matrix of ``rows`` rows; the counts sum to ``rows``."""
    counts = [0 if t.is_rest else (t.count if t.count is not None else int(round(rows * t.percent / 100.0)))
              for t in tiers]
    fixed = sum(counts)
    plan = format_row_bits(tiers)
    if fixed > rows:
        raise PgolfError(f"row_bits plan {plan!r} asks for {fixed} rows but the tensor has {rows}")
    rest = [i for i, t in enumerate(tiers) if t.is_rest]
    if rest:
        counts[rest[0]] = rows - fixed
    elif fixed != rows:
        raise PgolfError(f"row_bits plan {plan!r} covers {fixed} of {rows} rows; add a 'rest:BITS' tier")
    return counts


# --- ranking ---------------------------------------------------------------------------------------


def token_counts(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """How often each token id occurs (int64, length ``vocab``)."""
    t = np.asarray(tokens).reshape(-1)
    if vocab < 1:
        raise PgolfError(f"vocab must be >= 1, got {vocab}")
    if t.size and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise PgolfError(f"token ids span {int(t.min())}..{int(t.max())}, outside the vocabulary of {vocab}")
    return np.bincount(t.astype(np.int64), minlength=vocab).astype(np.int64)


def row_errors(w: np.ndarray, bits: int, clip: str = "sdclip", sigmas: float | None = None) -> np.ndarray:
    """Per-row squared error of RTN int-``bits`` on ``w`` (float64, length rows)."""
    w = np.asarray(w, dtype=np.float32)
    s, _ = choose_scales(w, bits, clip, sigmas)
    d = w.astype(np.float64) - dequantize_rows(quantize_with_scales(w, s, bits), s)
    return (d * d).sum(axis=1)


def row_damage(
    w: np.ndarray, freq: np.ndarray, low_bits: int, high_bits: int | None = None,
    clip: str = "sdclip", sigmas: float | None = None,
) -> np.ndarray:
    """Gradient-free importance per row: frequency × the squared error a low-bit row would add.

    With ``high_bits`` the score is the error saved by promoting the row (low minus high), the
    quantity a greedy allocation ranks by. Frequency stands in for how often the row's error
    reaches the loss (input lookups; for a tied head, roughly the softmax mass on the token).
    """
    freq = np.asarray(freq, dtype=np.float64).reshape(-1)
    w = np.asarray(w, dtype=np.float32)
    if freq.shape[0] != w.shape[0]:
        raise PgolfError(f"{freq.shape[0]} frequencies for a matrix of {w.shape[0]} rows")
    gain = row_errors(w, low_bits, clip, sigmas)
    if high_bits is not None:
        gain = gain - row_errors(w, high_bits, clip, sigmas)
    return freq * gain


def assign_tiers(score: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Tier id per row: the ``counts[0]`` highest-scoring rows get tier 0, and so on (ties by index)."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    tiers = np.empty(order.size, dtype=np.uint8)
    start = 0
    for i, n in enumerate(counts):
        tiers[order[start : start + n]] = i
        start += n
    return tiers


# --- the tier map ----------------------------------------------------------------------------------


def _bit_width(ntiers: int) -> int:
    return max(1, math.ceil(math.log2(ntiers)))


def _encode_bits(tiers: np.ndarray, ntiers: int) -> np.ndarray:
    b = _bit_width(ntiers)
    bits = np.unpackbits(tiers.astype(np.uint8)[:, None], axis=1)[:, 8 - b :]
    return np.packbits(bits.reshape(-1))


def _decode_bits(data: np.ndarray, rows: int, ntiers: int) -> np.ndarray:
    b = _bit_width(ntiers)
    bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
    if bits.size < rows * b:
        raise ArtifactError("tier map is shorter than the tensor's rows")
    bits = bits[: rows * b].reshape(rows, b)
    full = np.zeros((rows, 8), dtype=np.uint8)
    full[:, 8 - b :] = bits
    return np.packbits(full, axis=1).reshape(-1)


def _varint(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _encode_runs(tiers: np.ndarray, ntiers: int) -> np.ndarray:
    """First run's tier, then per run: length−1 as a LEB128 varint and (T > 2) the next run's tier."""
    edges = np.flatnonzero(np.diff(tiers.astype(np.int16))) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [tiers.size]]))
    out = bytearray([int(tiers[0])])
    for i, (s, n) in enumerate(zip(starts, lengths)):
        if i and ntiers > 2:
            out.append(int(tiers[s]))
        _varint(int(n) - 1, out)
    return np.frombuffer(bytes(out), dtype=np.uint8).copy()


def _decode_runs(data: np.ndarray, rows: int, ntiers: int) -> np.ndarray:
    buf = bytes(np.asarray(data, dtype=np.uint8))
    out = np.empty(rows, dtype=np.uint8)
    if not buf:
        raise ArtifactError("tier map is empty")
    tier, pos, row, first = buf[0], 1, 0, True
    while row < rows:
        if not first:
            if ntiers > 2:
                if pos >= len(buf):
                    raise ArtifactError("tier map ends early")
                tier, pos = buf[pos], pos + 1
            else:
                tier = 1 - tier
        first = False
        n, shift = 0, 0
        while True:
            if pos >= len(buf):
                raise ArtifactError("tier map ends early")
            byte, pos = buf[pos], pos + 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        n += 1
        if row + n > rows or tier >= ntiers:
            raise ArtifactError("tier map does not match the tensor's rows or tiers")
        out[row : row + n] = tier
        row += n
    return out


def encode_tier_map(tiers: np.ndarray, ntiers: int) -> tuple[np.ndarray, str]:
    """The shorter of a bit-packed id per row and a run-length map; returns (uint8 data, method)."""
    tiers = np.asarray(tiers, dtype=np.uint8).reshape(-1)
    packed = _encode_bits(tiers, ntiers)
    runs = _encode_runs(tiers, ntiers)
    return (runs, "runs") if runs.size < packed.size else (packed, "bits")


def decode_tier_map(data: np.ndarray, method: str, rows: int, ntiers: int) -> np.ndarray:
    if method == "bits":
        return _decode_bits(data, rows, ntiers)
    if method == "runs":
        return _decode_runs(data, rows, ntiers)
    raise ArtifactError(f"unknown tier map encoding {method!r}")


# --- quantize / dequantize -------------------------------------------------------------------------


def _tier_sigmas(tiers: Sequence[TierSpec], sigmas: float | Sequence[float | None] | None) -> list[float | None]:
    if sigmas is None or isinstance(sigmas, (int, float)):
        base = [None if sigmas is None else float(sigmas)] * len(tiers)
    else:
        base = list(sigmas)
        if len(base) != len(tiers):
            raise PgolfError(f"{len(base)} clip multiples given for {len(tiers)} row tiers")
    return [t.sigmas if t.sigmas is not None else b for t, b in zip(tiers, base)]


def quantize_mixed_rows(
    name: str,
    w: np.ndarray,
    dtype: str,
    row_bits_plan: str | Sequence[TierSpec],
    ranking: np.ndarray,
    clip: str = "sdclip",
    sigmas: float | Sequence[float | None] | None = None,
    hessian: np.ndarray | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> QuantizedTensor:
    """Quantize a 2-D ``w`` with per-row tiers of bits (scheme "introws").

    ``ranking`` is an importance score per row (higher = more bits), e.g. :func:`token_counts`
    or :func:`row_damage`. A tier's clip multiple comes from the plan (``@s``), else ``sigmas``
    (one value or one per tier), else it is searched. With ``hessian`` (cols × cols) every tier
    is GPTQ-quantized (rows are independent in GPTQ, so tiering commutes with the sweep).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise PgolfError(f"{name}: per-row bit tiers need a 2-D tensor, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise PgolfError(f"{name} contains NaN or Inf")
    rows, cols = w.shape
    score = np.asarray(ranking, dtype=np.float64).reshape(-1)
    if score.shape[0] != rows:
        raise PgolfError(f"{name}: ranking has {score.shape[0]} entries for {rows} rows")
    if not np.all(np.isfinite(score)):
        raise PgolfError(f"{name}: ranking contains NaN or Inf")
    specs = parse_row_bits(row_bits_plan) if isinstance(row_bits_plan, str) else list(row_bits_plan)
    counts = resolve_tiers(specs, rows)
    tier_sig = _tier_sigmas(specs, sigmas)
    tiers = assign_tiers(score, counts)
    # Empty tiers are dropped so stored tier ids are dense.
    keep = [i for i, n in enumerate(counts) if n > 0]
    remap = np.zeros(len(counts), dtype=np.uint8)
    remap[keep] = np.arange(len(keep), dtype=np.uint8)
    tiers = remap[tiers]

    prep = col_weight = None
    method = "rtn"
    if hessian is not None:
        from .gptq import check_hessian, gptq_sweep, prepare_hessian

        h = check_hessian(name, hessian, cols)
        prep = prepare_hessian(h, damp, True, name)
        col_weight = np.clip(np.diagonal(h).astype(np.float64), 0, None)
        method = "gptq"

    scale = np.zeros(rows, dtype=np.float16)
    streams: dict[str, Stream] = {}
    tier_params = []
    for t, i in enumerate(keep):
        idx = np.flatnonzero(tiers == t)
        bits = specs[i].bits
        wt = w[idx]
        s, info = choose_scales(wt, bits, clip, tier_sig[i], col_weight)
        q = quantize_with_scales(wt, s, bits) if prep is None else gptq_sweep(wt, prep, s, bits, block_size, name=name)
        scale[idx] = s
        r = qmax(bits)
        streams[f"q.t{t}"] = Stream(q.astype(np.int8), "symbols", -r, r)
        tier_params.append({"bits": bits, "rows": int(idx.size), **{k: v for k, v in info.items() if k != "searched"}})
    streams["scale"] = Stream(scale, "side")
    params: dict = {"method": method, "row_bits": format_row_bits(specs), "tiers": tier_params,
                    "bits": max(p["bits"] for p in tier_params)}
    if len(keep) > 1:
        data, how = encode_tier_map(tiers, len(keep))
        streams["tiers"] = Stream(data, "side")
        params["tier_map"] = how
    else:
        params["tier_map"] = "none"
    if prep is not None:
        params.update({"block_size": int(block_size), "damp": float(prep.damp)})
    return QuantizedTensor(name, (rows, cols), dtype, SCHEME, params, streams)


def tier_of_rows(qt: QuantizedTensor) -> np.ndarray:
    """The stored tier id of every row (uint8)."""
    ntiers = len(qt.params["tiers"])
    rows = qt.shape[0]
    if qt.params.get("tier_map", "none") == "none":
        return np.zeros(rows, dtype=np.uint8)
    return decode_tier_map(qt.streams["tiers"].data, qt.params["tier_map"], rows, ntiers)


@register_scheme(SCHEME)
def dequantize_introws(qt: QuantizedTensor) -> np.ndarray:
    rows = qt.shape[0]
    tiers = tier_of_rows(qt)
    scale = qt.streams["scale"].data.astype(np.float32)
    out = np.empty((rows, int(np.prod(qt.shape[1:]))), dtype=np.float32)
    for t, tp in enumerate(qt.params["tiers"]):
        idx = np.flatnonzero(tiers == t)
        q = qt.streams[f"q.t{t}"].data
        if q.shape[0] != idx.size or idx.size != tp["rows"]:
            raise ArtifactError(f"tensor {qt.name}: tier {t} holds {q.shape[0]} rows, its map says {idx.size}")
        out[idx] = dequantize_rows(q, scale[idx])
    return out


@register_check(SCHEME)
def check_introws(c: Check) -> None:
    rows, cols = c.matrix()
    tiers = c.list_param("tiers", 1, MAX_TIERS)
    total = 0
    for t, tp in enumerate(tiers):
        if not isinstance(tp, dict):
            c.fail(f"params.tiers[{t}] must be an object, got {tp!r:.40}")
        bits = c.int_param("bits", 2, 8, tp, f"params.tiers[{t}]")
        n = c.int_param("rows", 1, rows, tp, f"params.tiers[{t}]")
        r = qmax(bits)
        c.stream(f"q.t{t}", (n, cols), ("|i1",), "symbols", (-r, r))
        total += n
    if total != rows:
        c.fail(f"its tiers hold {total} rows, the tensor has {rows}")
    if c.int_param("bits", 2, 8) != max(tp["bits"] for tp in tiers):
        c.fail("params.bits is not the widest tier's bits")
    c.stream("scale", (rows,), ("<f2",), "side", (0, 0))
    how = c.choice_param("tier_map", ("none", "bits", "runs"))
    if (how == "none") != (len(tiers) == 1):
        c.fail(f"tier map {how!r} with {len(tiers)} tiers")
    if how == "bits":
        c.stream("tiers", (-(-rows * _bit_width(len(tiers)) // 8),), ("|u1",), "side", (0, 0))
    elif how == "runs":
        # First tier byte, then per run at most a tier byte and a LEB128 length of a row count.
        most = 1 + rows * (1 + -(-max(rows.bit_length(), 1) // 7))
        s = c.stream("tiers", None, ("|u1",), "side", (0, 0))
        if not 2 <= s.numel <= most:
            c.fail(f"run-length tier map of {s.numel} bytes for {rows} rows")
