"""Per-row symmetric int-k with fp16 row scales: round-to-nearest and the clip search.

Symbols lie in [-R, R] with R = 2^(k-1) - 1 and the weight is ``q * scale[row]``. The scale comes
from one of three clip rules:

* ``absmax``  – scale = max|w_row| / R (no clipping);
* ``sdclip``  – scale = c * std(w_row) / R, the records' std-based clip. With ``sigmas`` given, c is
  fixed (e.g. 12.85 for int6 as in the records, which trades error for fewer bytes); otherwise c is
  searched per tensor to minimise the (optionally column-weighted) squared error.
* ``mse``     – like sdclip, but c is searched per row (more side-free accuracy, more entropy).
"""

from __future__ import annotations

import numpy as np

from .base import QuantizedTensor, Stream, register_check, register_scheme
from .spec import Check

CLIP_RULES = ("absmax", "sdclip", "mse")
FP16_MAX = 65504.0
# Smallest positive normal fp16; keeps all-zero rows from dividing by zero.
SCALE_FLOOR = 2.0**-14


def qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return (1 << (bits - 1)) - 1


def to_fp16_scale(s: np.ndarray) -> np.ndarray:
    return np.clip(s, SCALE_FLOOR, FP16_MAX).astype(np.float16)


def quantize_with_scales(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Round ``w / scale`` to the int-k grid (scale broadcast per row)."""
    r = qmax(bits)
    s = scale.astype(np.float32).reshape(-1, 1)
    return np.clip(np.rint(w / s), -r, r).astype(np.int8)


def _row_err(w: np.ndarray, s: np.ndarray, r: int, col_weight: np.ndarray | None) -> np.ndarray:
    q = np.clip(np.rint(w / s[:, None]), -r, r)
    d = (w - q * s[:, None]) ** 2
    if col_weight is not None:
        d = d * col_weight[None, :]
    return d.sum(axis=1)


def _search_sigmas(err_of, lo: float, hi: float, coarse: int = 12, fine: int = 10) -> float:
    """Coarse log grid then a local refinement; the error curve in c is close to unimodal."""
    grid = np.geomspace(lo, hi, coarse)
    errs = [err_of(c) for c in grid]
    i = int(np.argmin(errs))
    a = grid[max(i - 1, 0)]
    b = grid[min(i + 1, coarse - 1)]
    best_c, best_e = grid[i], errs[i]
    for c in np.linspace(a, b, fine):
        e = err_of(c)
        if e < best_e:
            best_c, best_e = c, e
    return float(best_c)


def choose_scales(
    w: np.ndarray,
    bits: int,
    clip: str = "sdclip",
    sigmas: float | None = None,
    col_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Pick fp16 per-row scales for ``w`` (rows x cols). Returns (scales, info)."""
    if clip not in CLIP_RULES:
        raise ValueError(f"unknown clip rule {clip!r}; choose one of {', '.join(CLIP_RULES)}")
    w = np.asarray(w, dtype=np.float32)
    r = qmax(bits)
    absmax = np.abs(w).max(axis=1)
    if clip == "absmax":
        return to_fp16_scale(absmax / r), {"clip": "absmax"}
    std = w.std(axis=1, ddof=1) if w.shape[1] > 1 else np.zeros(w.shape[0], np.float32)
    # A constant row has no spread to scale by; fall back to its absmax.
    std = np.where(std > 0, std, absmax / max(r, 1))
    if clip == "sdclip" and sigmas is not None:
        return to_fp16_scale(sigmas * std / r), {"clip": "sdclip", "sigmas": float(sigmas)}
    # Beyond max|w|/std the clip no longer changes which values are clipped, only the step.
    hi = float(np.max(absmax / np.maximum(std, 1e-30))) * 1.05
    lo = min(1.0, hi)
    if clip == "sdclip":
        def tensor_err(c: float) -> float:
            return float(_row_err(w, to_fp16_scale(c * std / r).astype(np.float32), r, col_weight).sum())

        c = _search_sigmas(tensor_err, lo, max(hi, lo * 1.01))
        return to_fp16_scale(c * std / r), {"clip": "sdclip", "sigmas": c, "searched": True}
    # Per-row search over the same grid, vectorised across rows.
    grid = np.geomspace(lo, max(hi, lo * 1.01), 48)
    # Start from absmax so the per-row search is never worse than no clipping.
    best_s = to_fp16_scale(absmax / r).astype(np.float32)
    best = _row_err(w, best_s, r, col_weight)
    for c in grid:
        s = to_fp16_scale(c * std / r).astype(np.float32)
        e = _row_err(w, s, r, col_weight)
        better = e < best
        best = np.where(better, e, best)
        best_s = np.where(better, s, best_s)
    return best_s.astype(np.float16), {"clip": "mse"}


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32).reshape(-1, 1)


def make_intk_tensor(name: str, shape, dtype: str, q: np.ndarray, scale: np.ndarray, bits: int, params: dict) -> QuantizedTensor:
    r = qmax(bits)
    return QuantizedTensor(
        name=name,
        shape=tuple(shape),
        dtype=dtype,
        scheme="intk",
        params={"bits": bits, **params},
        streams={
            "q": Stream(q.astype(np.int8), "symbols", -r, r),
            "scale": Stream(scale.astype(np.float16), "side"),
        },
    )


def quantize_rtn(
    name: str,
    w: np.ndarray,
    dtype: str,
    bits: int,
    clip: str = "sdclip",
    sigmas: float | None = None,
    col_weight: np.ndarray | None = None,
) -> QuantizedTensor:
    w = np.asarray(w, dtype=np.float32)
    scale, info = choose_scales(w, bits, clip, sigmas, col_weight)
    q = quantize_with_scales(w, scale, bits)
    return make_intk_tensor(name, w.shape, dtype, q, scale, bits, {"method": "rtn", **info})


@register_scheme("intk")
def dequantize_intk(qt: QuantizedTensor) -> np.ndarray:
    return dequantize_rows(qt.streams["q"].data.reshape(qt.shape[0], -1), qt.streams["scale"].data)


@register_check("intk")
def check_intk(c: Check) -> None:
    rows, cols = c.matrix()
    r = qmax(c.int_param("bits", 2, 8))
    c.stream("q", (rows, cols), ("|i1",), "symbols", (-r, r))
    c.stream("scale", (rows,), ("<f2",), "side", (0, 0))
