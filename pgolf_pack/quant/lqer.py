"""LQER: a low-rank correction of a quantized tensor's error, stored as two small quantized factors.

For a quantized weight Ŵ (any scheme ``dequantize_float32`` can decode) the error E = W − Ŵ is
approximated by A·B with A (rows × r) and B (r × cols); decoding adds Â·B̂ to Ŵ through the
``"lqer"`` correction registered below, so every scheme gains it without knowing about it.

Factor storage. Each factor is kept as r *component rows* (Aᵀ and B), split into groups of
``group`` consecutive elements with one fp16 scale per group; a group never spans two components
because the components' magnitudes differ by their singular values. Codes use the **mid-rise**
grid (q + ½)·s with q ∈ [−2^(k−1), 2^(k−1) − 1]: all 2^k codes are used and the levels are
symmetric about zero, which suits zero-mean SVD factors (at k=2 the levels ±½s, ±1½s sit close to
the 4-level Lloyd–Max quantizer of a Gaussian). The record's "asymmetric" LQER meant *different
precisions for A and B* (INT2 A, INT4 B), not zero-points; ``bits_a`` gives that split here. A
zero-point per group would cost another fp16 per 64 codes for factors whose mean is ~0 already.
Each group's scale is picked by a small clip search (squared error).

Fitting. A's column space is the top-r left singular space of E (or of E·L with H = L·Lᵀ for the
activation-aware variant, which minimises trace(E H Eᵀ) instead of ‖E‖²). A is quantized first,
then B is refit by least squares against Â before being quantized, so B absorbs A's rounding.
That refit is the optimum for both the plain and the Hessian-weighted objective (the normal
equations Âᵀ(E − Â·B)·H = 0 do not depend on H once H is invertible).

Measured on the bench checkpoint (RTN int6 at 12.85σ, 12 val sequences): the plain fit barely
moves BPB, the Hessian-weighted fit ("chol"; "diag" is close) on the tied embedding recovers most
of the quantization gap for ~3 KB, because one final-norm channel carries ~80% of that H and
the plain SVD does not aim at it. An INT2 A (the record's split) was worse than INT4 A there.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch

from ..checkpoint import to_float32
from ..errors import ArtifactError, PgolfError
from .base import QuantizedModel, QuantizedTensor, Stream, dequantize_float32, register_correction, register_correction_check
from .rtn import FP16_MAX, SCALE_FLOOR
from .spec import Check

PARAMS_KEY = "lqer"
STREAMS = ("lqer.A", "lqer.sA", "lqer.B", "lqer.sB")
WEIGHTINGS = ("none", "diag", "chol")
SCORES = ("auto", "plain", "weighted", "relative")
FACTOR_KINDS = ("symbols", "side")
# Fraction of max|x| tried as the top level of a group; the search keeps the best per group.
_CLIP_GRID = np.linspace(0.30, 1.0, 22)
# Relative damping of H before a Cholesky / square root (as GPTQ's 1%): dead inputs stay finite.
_DAMP = 0.01


# --- factor quantization ---------------------------------------------------------------------------


def code_range(bits: int) -> tuple[int, int]:
    if not 1 <= bits <= 8:
        raise PgolfError(f"LQER factor bits must be in 1..8, got {bits}")
    half = 1 << (bits - 1)
    return -half, half - 1


def _grouped(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(r, n) -> zero-padded (r, ngroups, group) and the mask of real elements."""
    r, n = x.shape
    ng = -(-n // group)
    pad = np.zeros((r, ng * group), dtype=np.float64)
    pad[:, :n] = x
    mask = np.zeros(ng * group, dtype=bool)
    mask[:n] = True
    return pad.reshape(r, ng, group), mask.reshape(ng, group)


def _codes(xg: np.ndarray, s: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.floor(xg / s[..., None]), lo, hi)


def quantize_factor(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize the rows of ``x`` (r × n) in groups; returns (int8 codes (r, n), fp16 scales (r, ngroups))."""
    if group < 1:
        raise PgolfError(f"LQER group size must be >= 1, got {group}")
    lo, hi = code_range(bits)
    x = np.asarray(x, dtype=np.float64)
    r, n = x.shape
    xg, mask = _grouped(x, group)
    absmax = np.abs(np.where(mask, xg, 0.0)).max(axis=2)
    best_s = np.full(absmax.shape, SCALE_FLOOR, dtype=np.float64)
    best_e = np.full(absmax.shape, np.inf)
    for c in _CLIP_GRID:
        # The top level (hi + ½)·s lands at c·max|x|; scales are searched as the fp16 they become.
        s = np.clip(c * absmax / (hi + 0.5), SCALE_FLOOR, FP16_MAX).astype(np.float16).astype(np.float64)
        q = _codes(xg, s, lo, hi)
        e = (((q + 0.5) * s[..., None] - xg) ** 2 * mask).sum(axis=2)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_s = np.where(better, s, best_s)
    q = _codes(xg, best_s, lo, hi).reshape(r, -1)[:, :n]
    return q.astype(np.int8), best_s.astype(np.float16)


def dequantize_factor(codes: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """Inverse of :func:`quantize_factor` as float32 (r × n)."""
    codes = np.asarray(codes)
    r, n = codes.shape
    # Indexing instead of np.repeat: a group wider than the factor would repeat past its end.
    s = np.asarray(scales, dtype=np.float32).reshape(r, -1)[:, np.arange(n) // group]
    return (codes.astype(np.float32) + np.float32(0.5)) * s


# --- the correction --------------------------------------------------------------------------------


def lqer_term(qt: QuantizedTensor) -> np.ndarray:
    """Â·B̂ of a tensor carrying LQER factors, float64 (rows × cols).

    Float64 keeps the product independent of the BLAS kernel's summation order once rounded to
    float32, so every machine decodes the same weights.
    """
    p = qt.params[PARAMS_KEY]
    try:
        a = dequantize_factor(qt.streams["lqer.A"].data, qt.streams["lqer.sA"].data, p["group"])
        b = dequantize_factor(qt.streams["lqer.B"].data, qt.streams["lqer.sB"].data, p["group"])
    except KeyError as e:
        raise ArtifactError(f"tensor {qt.name} has LQER parameters but no stream/field {e}") from None
    return a.T.astype(np.float64) @ b.astype(np.float64)


@register_correction(PARAMS_KEY)
def _apply_correction(qt: QuantizedTensor, w: np.ndarray) -> np.ndarray:
    rows = qt.shape[0]
    return (np.asarray(w, dtype=np.float64).reshape(rows, -1) + lqer_term(qt)).astype(np.float32)


@register_correction_check(PARAMS_KEY)
def check_lqer(c: Check) -> None:
    """Factors (rank × rows) and (rank × cols) with one scale per ``group`` codes."""
    rows, cols = c.matrix()
    p = c.dict_param(PARAMS_KEY)
    rank = c.int_param("rank", 1, min(rows, cols), p, "params.lqer")
    bits = c.int_param("bits", 1, 8, p, "params.lqer")
    bits_a = c.int_param("bits_a", 1, 8, p, "params.lqer")
    group = c.int_param("group", 1, 2**31, p, "params.lqer")
    c.stream("lqer.A", (rank, rows), ("|i1",), FACTOR_KINDS, code_range(bits_a))
    c.stream("lqer.B", (rank, cols), ("|i1",), FACTOR_KINDS, code_range(bits))
    c.stream("lqer.sA", (rank, -(-rows // group)), ("<f2",), "side", (0, 0))
    c.stream("lqer.sB", (rank, -(-cols // group)), ("<f2",), "side", (0, 0))


def strip_lqer(qt: QuantizedTensor) -> QuantizedTensor:
    """The same tensor without its LQER factors (a new object; ``qt`` is untouched)."""
    params = {k: v for k, v in qt.params.items() if k != PARAMS_KEY}
    streams = {k: v for k, v in qt.streams.items() if k not in STREAMS}
    return QuantizedTensor(qt.name, qt.shape, qt.dtype, qt.scheme, params, streams)


# --- fitting ---------------------------------------------------------------------------------------


def _weighting_mode(weighted: bool | str) -> str:
    mode = ("chol" if weighted else "none") if isinstance(weighted, bool) else weighted
    if mode not in WEIGHTINGS:
        raise PgolfError(f"LQER weighting must be one of {', '.join(WEIGHTINGS)} (or a bool), got {weighted!r}")
    return mode


def _damped(h: np.ndarray) -> np.ndarray:
    h = 0.5 * (np.asarray(h, dtype=np.float64) + np.asarray(h, dtype=np.float64).T)
    d = float(np.mean(np.diag(h)))
    return h + (_DAMP * d if d > 0 else 1.0) * np.eye(h.shape[0])


def left_space(e: np.ndarray, rank: int, mode: str = "none", h: np.ndarray | None = None) -> np.ndarray:
    """U_r·sqrt(S_r) of E (or of E·diag(sqrt(diag H)) / E·L): the column space A spans."""
    e = np.asarray(e, dtype=np.float64)
    if mode == "none":
        m = e
    elif h is None:
        raise PgolfError("activation-weighted LQER needs a Hessian")
    elif mode == "diag":
        m = e * np.sqrt(np.diag(_damped(h)))[None, :]
    else:
        m = e @ np.linalg.cholesky(_damped(h))
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return u[:, :rank] * np.sqrt(s[:rank])[None, :]


def fit_lqer(
    e: np.ndarray,
    rank: int,
    bits: int = 4,
    group: int = 64,
    bits_a: int | None = None,
    weighted: bool | str = False,
    h: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Quantized factors for the error ``e``: {"A": codes (r, rows), "sA", "B": codes (r, cols), "sB"}."""
    e = np.asarray(e, dtype=np.float64)
    if e.ndim != 2:
        raise PgolfError(f"LQER needs a 2-D error matrix, got shape {e.shape}")
    if rank < 1:
        raise PgolfError(f"LQER rank must be >= 1, got {rank}")
    rank = min(rank, *e.shape)
    a = left_space(e, rank, _weighting_mode(weighted), h)
    qa, sa = quantize_factor(a.T, bits if bits_a is None else bits_a, group)
    a_hat = dequantize_factor(qa, sa, group).T.astype(np.float64)
    b, *_ = np.linalg.lstsq(a_hat, e, rcond=None)
    qb, sb = quantize_factor(b, bits, group)
    return {"A": qa, "sA": sa, "B": qb, "sB": sb}


def attach_lqer(
    qt: QuantizedTensor,
    factors: Mapping[str, np.ndarray],
    bits: int,
    group: int,
    bits_a: int | None = None,
    weighted: str = "none",
    kind: str = "symbols",
) -> None:
    """Store ``factors`` on ``qt`` (in place), replacing any earlier LQER factors."""
    if kind not in FACTOR_KINDS:
        raise PgolfError(f"LQER factor stream kind must be 'symbols' or 'side', got {kind!r}")
    ba = bits if bits_a is None else bits_a
    for k in STREAMS:
        qt.streams.pop(k, None)
    qt.streams["lqer.A"] = Stream(factors["A"].astype(np.int8), kind, *code_range(ba))
    qt.streams["lqer.sA"] = Stream(factors["sA"].astype(np.float16), "side")
    qt.streams["lqer.B"] = Stream(factors["B"].astype(np.int8), kind, *code_range(bits))
    qt.streams["lqer.sB"] = Stream(factors["sB"].astype(np.float16), "side")
    qt.params[PARAMS_KEY] = {"rank": int(factors["A"].shape[0]), "bits": int(bits), "bits_a": int(ba),
                             "group": int(group), "weighted": weighted}


def weighted_error(d: np.ndarray, h: np.ndarray) -> float:
    """trace(D H Dᵀ), the layer-output squared error summed over the calibration inputs."""
    d = np.asarray(d, dtype=np.float64)
    return float(np.einsum("ij,ij->", d @ np.asarray(h, dtype=np.float64), d))


def _candidates(qm: QuantizedModel, originals: Mapping, names: Iterable[str] | None) -> list[QuantizedTensor]:
    if names is not None:
        wanted = list(names)
        have = set(qm.names())
        missing = [n for n in wanted if n not in have]
        if missing:
            raise PgolfError(f"LQER: no quantized tensor named {', '.join(missing)}")
        pool = [qm[n] for n in wanted]
    else:
        pool = [t for t in qm.tensors if t.scheme != "float" and len(t.shape) == 2]
    for t in pool:
        if t.scheme == "float" or len(t.shape) != 2:
            raise PgolfError(f"LQER: {t.name} is not a quantized 2-D tensor")
        if t.name not in originals:
            raise PgolfError(f"LQER: no original weights given for {t.name}")
    return pool


def apply_lqer(
    qm: QuantizedModel,
    originals: Mapping[str, torch.Tensor | np.ndarray],
    hessians: Mapping[str, np.ndarray] | None,
    top_k: int,
    rank: int,
    bits: int = 4,
    group: int = 64,
    weighted: bool | str = False,
    bits_a: int | None = None,
    kind: str = "symbols",
    names: Iterable[str] | None = None,
    score: str = "auto",
) -> list[dict]:
    """Add LQER factors to the ``top_k`` most damaged tensors of ``qm`` (in place).

    Damage (``score``): "plain" ‖E‖²; "weighted" trace(E H Eᵀ); "relative" trace(E H Eᵀ) /
    trace(W H Wᵀ), comparable across layers whose inputs differ in scale; "auto" = relative
    with ``hessians``, else plain. (On the bench checkpoint the absolute weighted score ranks
    the mlp.proj layers first, whose post-ReLU² inputs are large, and LQER there did not move
    BPB; the relative score keeps the tied embedding in the top 3, where it did.) Hessian scores need one for every candidate. Candidates are
    all quantized 2-D tensors, or ``names``. ``weighted`` (True = "chol", or "diag") fits the
    factors in the Hessian norm. Returns one row per chosen tensor, most damaged first: name,
    score, err_before/err_after (‖·‖²), werr_before/werr_after (trace form, None without
    Hessians) and factor_bytes (raw bytes of the four factor streams).
    """
    if top_k < 0:
        raise PgolfError(f"LQER top_k must be >= 0, got {top_k}")
    mode = _weighting_mode(weighted)
    if mode != "none" and hessians is None:
        raise PgolfError("activation-weighted LQER needs Hessians (--hessians)")
    if score not in SCORES:
        raise PgolfError(f"LQER score must be one of {', '.join(SCORES)}, got {score!r}")
    if score == "auto":
        score = "plain" if hessians is None else "relative"
    if score != "plain" and hessians is None:
        raise PgolfError(f"the LQER {score} score needs Hessians (--hessians)")
    code_range(bits)
    code_range(bits if bits_a is None else bits_a)
    pool = _candidates(qm, originals, names)
    if hessians is not None:
        lacking = [t.name for t in pool if t.name not in hessians]
        if lacking:
            raise PgolfError(f"LQER: the Hessians have no entry for {', '.join(lacking[:3])}"
                             f"{' …' if len(lacking) > 3 else ''}; restrict the candidates or drop the Hessians")
    scored = []
    for t in pool:
        w = _as_float(originals[t.name]).reshape(t.shape[0], -1)
        if w.shape != (t.shape[0], int(np.prod(t.shape[1:]))):
            raise PgolfError(f"LQER: original {t.name} has shape {w.shape}, quantized tensor has {t.shape}")
        base = strip_lqer(t)
        e = w.astype(np.float64) - dequantize_float32(base).reshape(w.shape).astype(np.float64)
        h = None if hessians is None else np.asarray(hessians[t.name], dtype=np.float64)
        if h is not None and h.shape != (e.shape[1], e.shape[1]):
            raise PgolfError(f"Hessian for {t.name} has shape {h.shape}, expected {(e.shape[1], e.shape[1])}")
        if score == "plain":
            damage = float((e * e).sum())
        else:
            damage = weighted_error(e, h)
            if score == "relative":
                damage /= max(weighted_error(w, h), 1e-300)
        scored.append((damage, t, e, h))
    # Stable order: ties keep model order.
    scored.sort(key=lambda x: -x[0])
    rows = []
    for damage, t, e, h in scored[:top_k]:
        f = fit_lqer(e, rank, bits, group, bits_a, mode, h)
        attach_lqer(t, f, bits, group, bits_a, mode, kind)
        d = e - lqer_term(t)
        rows.append({
            "name": t.name, "score": damage, "rank": int(f["A"].shape[0]),
            "err_before": float((e * e).sum()), "err_after": float((d * d).sum()),
            "werr_before": weighted_error(e, h) if h is not None else None,
            "werr_after": weighted_error(d, h) if h is not None else None,
            "factor_bytes": sum(t.streams[k].data.nbytes for k in STREAMS),
        })
    return rows


def _as_float(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return to_float32(t) if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)
