"""Entropy-coded scalar quantization (scheme "ecsq"): a free real step, unbounded integer codes.

Unlike int-k there is no code range to fit and nothing is clipped: the step is a real parameter
and the codes are whatever integers the weights need, coded by the entropy coder (its escape path
keeps rare large codes exact and cheap). Weight (i, j) is ``q[i, j] * scale[i] * g[j]``:

* ``scale`` – fp16 per row, ``delta × base[i]``; ``base`` is the row's std (``row_mode="std"``,
  the records' per-row normalisation) or the tensor's std for every row (``"flat"``: one step for
  the whole matrix, what the layer-output error alone would ask for);
* ``g`` – optional per-column multipliers ``2^(e[j]/COL_STEPS)`` with small integer exponents
  ``e`` (a symbols stream). With a Hessian they follow the equal-slope rule inside the matrix:
  GPTQ's objective weighs column j's squared rounding error by ``w_j = 1/[U]_jj²`` (U the upper
  Cholesky factor of H⁻¹ in sweep order), and at high rate the error per unit of rate is equal
  across columns when ``step_j² · w_j`` is the same for all j, i.e. ``g_j ∝ w_j^(-1/2)``.
  ``col_beta`` interpolates between none (0) and the full rule (1).

With a Hessian the codes come from the GPTQ sweep (:func:`.gptq.gptq_sweep_range`) with a
swappable rounding function, so rate-aware rounding (:mod:`.rdoq`) reuses all of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PgolfError
from .base import QuantizedTensor, Stream, register_check, register_scheme
from .gptq import (
    PreparedHessian,
    RoundFn,
    check_hessian,
    check_weight,
    gptq_sweep_range,
    prepare_hessian,
    round_nearest,
    sweep_device,
)
from .rtn import to_fp16_scale
from .spec import Check

SCHEME = "ecsq"
ROW_MODES = ("std", "flat")
COL_STEPS = 4  # column multipliers move in quarter octaves
COL_EXP_MIN, COL_EXP_MAX = -8 * COL_STEPS, 12 * COL_STEPS
# Far beyond any code a finite fp16 step produces; the sweep's range check then never bites.
CODE_MAX = 2**30


@dataclass
class EcsqGrid:
    """Everything that fixes the reconstruction grid of one matrix before any rounding."""

    scale: np.ndarray  # fp16 (rows,)
    col_exp: np.ndarray | None  # int8 (cols,) or None for no column multipliers
    delta: float
    row_mode: str
    col_beta: float

    @property
    def col_mult(self) -> np.ndarray | None:
        return None if self.col_exp is None else col_multipliers(self.col_exp)

    def steps(self) -> np.ndarray:
        """The float32 step of every entry (rows × 1, or rows × cols), exactly as the dequantizer uses it."""
        return entry_steps(self.scale, self.col_exp)


def row_base(w: np.ndarray, row_mode: str = "std") -> np.ndarray:
    """Per-row spread the step is a multiple of (float64, rows)."""
    if row_mode not in ROW_MODES:
        raise PgolfError(f"unknown row mode {row_mode!r}; choose one of {', '.join(ROW_MODES)}")
    w = np.asarray(w, dtype=np.float64)
    tensor_std = float(w.std()) if w.size > 1 else 0.0
    if tensor_std == 0.0:
        tensor_std = float(np.abs(w).max(initial=0.0)) or 1.0
    if row_mode == "flat" or w.shape[1] < 2:
        return np.full(w.shape[0], tensor_std)
    std = w.std(axis=1, ddof=1)
    # A constant row has no spread; give it the tensor's step so it still reconstructs closely.
    return np.where(std > 0, std, tensor_std)


def column_weights(prep: PreparedHessian) -> np.ndarray:
    """GPTQ's per-column error weight 1/[U]_jj² in original column order (0 for dead columns)."""
    d = torch.diagonal(prep.u).cpu().numpy().astype(np.float64)
    ew = np.empty_like(d)
    ew[prep.perm.numpy()] = 1.0 / (d * d)
    ew[prep.dead] = 0.0
    return ew


def col_exponents(ew: np.ndarray, beta: float) -> np.ndarray:
    """Quarter-octave exponents of ``g_j ∝ ew_j^(-beta/2)``, geometric mean ≈ 1 over live columns."""
    ew = np.asarray(ew, dtype=np.float64)
    live = ew > 0
    e = np.full(ew.shape, COL_EXP_MAX, dtype=np.float64)
    if live.any():
        lg = np.log2(ew[live])
        e[live] = -0.5 * beta * (lg - lg.mean()) * COL_STEPS
    return np.clip(np.rint(e), COL_EXP_MIN, COL_EXP_MAX).astype(np.int8)


def col_multipliers(col_exp: np.ndarray) -> np.ndarray:
    return np.exp2(np.asarray(col_exp, dtype=np.float32) / np.float32(COL_STEPS)).astype(np.float32)


def make_grid(w: np.ndarray, delta: float, prep: PreparedHessian | None = None, row_mode: str = "std",
              col_beta: float = 0.0, base: np.ndarray | None = None, col_exp: np.ndarray | None = None) -> EcsqGrid:
    """The grid at step multiple ``delta``. ``base`` (``row_base(w, row_mode)``) and ``col_exp``
    (the column exponents at ``col_beta``) do not depend on the step: a caller probing many
    steps of one matrix passes them computed once."""
    if not (np.isfinite(delta) and delta > 0):
        raise PgolfError(f"ecsq step delta must be a positive number, got {delta}")
    if col_beta and prep is None:
        raise PgolfError("per-column steps (col_beta > 0) need a Hessian")
    if not 0.0 <= col_beta <= 2.0:
        raise PgolfError(f"col_beta must be in [0, 2], got {col_beta}")
    scale = to_fp16_scale(delta * (row_base(w, row_mode) if base is None else base))
    if not col_beta:
        col_exp = None
    elif col_exp is None:
        col_exp = col_exponents(column_weights(prep), col_beta)
    return EcsqGrid(scale, col_exp, float(delta), row_mode, float(col_beta))


def symbol_dtype(lo: int, hi: int) -> np.dtype:
    return np.dtype(np.int16) if -(2**15) <= lo and hi < 2**15 else np.dtype(np.int32)


def ecsq_codes(w: np.ndarray, grid: EcsqGrid, prep: PreparedHessian | None = None, round_fn: RoundFn = round_nearest,
               block_size: int = 128, name: str = "weight", device: "str | torch.device | None" = None) -> np.ndarray:
    """int32 codes on ``grid``: the GPTQ sweep with ``round_fn`` when ``prep`` is given, else the
    same ``round_fn`` applied column by column with no error feedback (unit error weight).
    ``device``: where the torch work runs (default: where ``prep`` lives, else the CPU)."""
    w = check_weight(name, w)
    if prep is not None:
        return gptq_sweep_range(w, prep, grid.scale, CODE_MAX, block_size=block_size, round_fn=round_fn, name=name,
                                col_mult=grid.col_mult, device=device)
    dev = sweep_device(device)
    s = torch.from_numpy(grid.scale.astype(np.float32)).to(dev)
    wt = torch.from_numpy(np.ascontiguousarray(w.T)).to(dev)
    mult = grid.col_mult
    q = torch.empty_like(wt)
    for j in range(w.shape[1]):
        sj = s if mult is None else s * float(mult[j])
        q[j] = round_fn(wt[j], sj, qmax=CODE_MAX, col=j, err_weight=1.0)
    return np.ascontiguousarray(q.round().to(torch.int32).cpu().numpy().T)


def make_ecsq_tensor(name: str, shape, dtype: str, q: np.ndarray, grid: EcsqGrid, params: dict) -> QuantizedTensor:
    q = np.asarray(q)
    lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    streams = {"q": Stream(q.astype(symbol_dtype(lo, hi)), "symbols", lo, hi),
               "scale": Stream(grid.scale.astype(np.float16), "side")}
    if grid.col_exp is not None:
        e = grid.col_exp.astype(np.int8)
        streams["colexp"] = Stream(e, "symbols", int(e.min()), int(e.max()))
    p = {"method": "ecsq", "delta": grid.delta, "row_mode": grid.row_mode, "col_beta": grid.col_beta, **params}
    # Sorted stream names: the manifest stores them sorted, so unpack → repack keeps the group order.
    return QuantizedTensor(name=name, shape=tuple(shape), dtype=dtype, scheme=SCHEME, params=p,
                           streams=dict(sorted(streams.items())))


def quantize_ecsq(
    name: str,
    w: np.ndarray,
    dtype: str,
    delta: float,
    H: np.ndarray | PreparedHessian | None = None,
    row_mode: str = "std",
    col_beta: float = 0.0,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    device: "str | torch.device | None" = None,
) -> QuantizedTensor:
    """ECSQ one matrix with round-to-nearest (GPTQ sweep when ``H`` is given), on ``device``."""
    w = check_weight(name, w)
    prep = as_prepared(name, w, H, damp, act_order, device)
    grid = make_grid(w, delta, prep, row_mode, col_beta)
    q = ecsq_codes(w, grid, prep, block_size=block_size, name=name, device=device)
    params = {"gptq": prep is not None}
    if prep is not None:
        params.update(block_size=int(block_size), damp=float(prep.damp), act_order=bool(prep.act_order))
    return make_ecsq_tensor(name, w.shape, dtype, q, grid, params)


def as_prepared(name: str, w: np.ndarray, H: np.ndarray | PreparedHessian | None, damp: float = 0.01,
                act_order: bool = True, device: "str | torch.device | None" = None) -> PreparedHessian | None:
    if H is None or isinstance(H, PreparedHessian):
        if H is not None and H.cols != w.shape[1]:
            raise PgolfError(f"Hessian for {name} is {H.cols}×{H.cols}, expected {w.shape[1]}×{w.shape[1]}")
        return H
    return prepare_hessian(check_hessian(name, H, w.shape[1]), damp, act_order, name, device)


def entry_steps(scale: np.ndarray, col_exp: np.ndarray | None) -> np.ndarray:
    """float32 step of every entry: ``scale[i] * g[j]``, multiplied in that order (as the sweep does)."""
    s = scale.astype(np.float32).reshape(-1, 1)
    return s if col_exp is None else s * col_multipliers(col_exp)[None, :]


def dequantize_ecsq_arrays(q: np.ndarray, scale: np.ndarray, col_exp: np.ndarray | None) -> np.ndarray:
    return q.astype(np.float32) * entry_steps(scale, col_exp)


@register_scheme(SCHEME)
def dequantize_ecsq(qt: QuantizedTensor) -> np.ndarray:
    q = qt.streams["q"].data.reshape(qt.shape[0], -1)
    e = qt.streams["colexp"].data if "colexp" in qt.streams else None
    return dequantize_ecsq_arrays(q, qt.streams["scale"].data, e)


def check_codes(c: Check, name: str, shape: tuple[int, ...] | None) -> int:
    """A free-range code stream in the dtype its claimed range picks; returns its length."""
    s = c.stream(name, shape, ("<i2", "<i4"), "symbols")
    c.symbol_range(s, name, -(2**31), 2**31 - 1)
    if s.dtype != symbol_dtype(s.lo, s.hi).str:
        c.fail(f"stream {name} is {s.dtype} but its range [{s.lo}, {s.hi}] is stored as {symbol_dtype(s.lo, s.hi).str}")
    return s.numel


def check_steps(c: Check, rows: int, cols: int) -> None:
    """The fp16 row steps and the optional per-column exponents shared with the trellis scheme."""
    c.stream("scale", (rows,), ("<f2",), "side", (0, 0))
    if c.has("colexp"):
        s = c.stream("colexp", (cols,), ("|i1",), "symbols")
        c.symbol_range(s, "colexp", COL_EXP_MIN, COL_EXP_MAX)


@register_check(SCHEME)
def check_ecsq(c: Check) -> None:
    rows, cols = c.matrix()
    check_codes(c, "q", (rows, cols))
    check_steps(c, rows, cols)
