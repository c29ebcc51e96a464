"""Equal-slope step allocation across a model: one λ (loss per bit) sets every matrix's step.

One global λ (loss per bit) sets every matrix's step so the marginal loss per byte is the same
everywhere. The loss of matrix t is modelled as ``sens_t · trace(ΔW H ΔWᵀ)`` with H the
count-normalised Hessian (GPTQ's objective) and ``sens_t`` a per-tensor sensitivity (1 by
default; measured by :func:`pgolf_pack.calib.sensitivity.measure_sensitivity` — quantize one
matrix, score the loss on training tokens; a model runs there, so it lives in calib/). The proxy
alone is not comparable across layers (on the bench checkpoint the measured multipliers span six
orders of magnitude, deep layers being nearly free), so budgets want measured values. At high
rate a step s on an entry whose
squared error carries weight ω costs D ≈ ω s²/12 and R ≈ h - log2 s bits, so dD/dR = -(ln2/6)·ω s².
Equal slope λ across all entries of all matrices therefore asks for

    Δ_t² · K_t · sens_t = 6 λ / ln 2,     K_t = mean_i(base_i²) · mean_j(ω_j g_j²)

where ``base`` and ``g`` are the row spreads and column multipliers of :mod:`.ecsq` and ω_j is
GPTQ's column weight. Inside a matrix the same rule sets the column multipliers (``col_beta=1``)
and RDOQ prices bits with the same λ, so one number steers every choice.

Meeting a byte budget needs the packer, which sits above quant/: the λ search and the byte
predictor live in :mod:`pgolf_pack.rd_search`; this module only supplies its starting point.

``prepare_model(device=...)`` factorizes every Hessian on that device and keeps the factors
there, and every quantization of the :class:`ModelPrep` (each λ probe) sweeps there too; codes
come back to numpy for the packer.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from .. import __version__
from ..checkpoint import DEFAULT_MIN_NUMEL, check_finite, dtype_name, is_quantizable, to_float32
from ..errors import PgolfError
from ..quant.passthrough import store_float
from .base import QuantizedModel, QuantizedTensor
from .ecsq import (
    ROW_MODES,
    column_weights,
    col_exponents,
    col_multipliers,
    ecsq_codes,
    make_ecsq_tensor,
    make_grid,
    row_base,
)
from .gptq import PreparedHessian, check_hessian, prepare_hessian
from .rdoq import RATE_MODELS, rdoq_codes

METHODS = ("ecsq", "rdoq", "trellis")
ALLOCS = ("slope", "uniform")
SLOPE = 6.0 / math.log(2.0)


@dataclass(frozen=True)
class RDConfig:
    """How every quantizable matrix is coded; the step itself comes from λ."""

    method: str = "rdoq"
    alloc: str = "slope"  # "uniform": the same step multiple Δ = √(6λ/ln2) for every matrix
    row_mode: str = "flat"
    col_beta: float = 1.0
    rdoq_gain: float = 1.0  # RDOQ's λ relative to the allocation λ
    iters: int = 1
    rate_model: str = "col"
    trellis_states: int = 4
    trellis_coding: str = "plain"
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    min_numel: int = DEFAULT_MIN_NUMEL
    passthrough: str = "float"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PgolfError(f"unknown rate-distortion method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.alloc not in ALLOCS:
            raise PgolfError(f"unknown allocation {self.alloc!r}; choose one of {', '.join(ALLOCS)}")
        if self.row_mode not in ROW_MODES:
            raise PgolfError(f"unknown row mode {self.row_mode!r}; choose one of {', '.join(ROW_MODES)}")
        if self.rate_model not in RATE_MODELS:
            raise PgolfError(f"unknown rate model {self.rate_model!r}; choose one of {', '.join(RATE_MODELS)}")
        if self.passthrough not in ("float", "fp16"):
            raise PgolfError("passthrough must be 'float' or 'fp16'")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TensorInfo:
    """What the allocation needs of one quantizable matrix, computed once per model."""

    name: str
    w: np.ndarray  # float32
    dtype: str
    prep: PreparedHessian | None
    h: np.ndarray | None  # count-normalised Hessian (for the proxy error)
    sens: float
    k: float  # K_t of the slope rule (see the module docstring)
    # What every λ probe of this matrix shares: its row spreads and column step exponents.
    _grid_parts: tuple | None = None  # (row_mode, col_beta, row spreads, column exponents)

    def grid(self, delta: float, cfg: "RDConfig"):
        """The ECSQ grid at step multiple ``delta``, its λ-independent parts computed once."""
        beta = cfg.col_beta if self.prep is not None else 0.0
        if self._grid_parts is None or self._grid_parts[:2] != (cfg.row_mode, beta):
            col_exp = col_exponents(column_weights(self.prep), beta) if beta else None
            self._grid_parts = (cfg.row_mode, beta, row_base(self.w, cfg.row_mode), col_exp)
        _, _, base, col_exp = self._grid_parts
        return make_grid(self.w, delta, self.prep, cfg.row_mode, beta, base=base, col_exp=col_exp)

    @property
    def numel(self) -> int:
        return int(self.w.size)


@dataclass
class ModelPrep:
    tensors: list[TensorInfo]
    passthrough: dict[str, QuantizedTensor]  # float tensors, already stored
    order: list[str]  # checkpoint order
    cfg: RDConfig
    # Where the sweeps run. Not part of cfg: cfg goes into the artifact, and where the work ran
    # is not a property of the artifact.
    device: torch.device = torch.device("cpu")

    def info(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def sensitivity_of(name: str, sensitivity: Mapping[str, float] | None) -> float:
    if not sensitivity:
        return 1.0
    if name in sensitivity:
        return float(sensitivity[name])
    for pat, v in sensitivity.items():
        if fnmatch.fnmatchcase(name, pat):
            return float(v)
    return 1.0


def load_sensitivity(path: str | os.PathLike | None) -> dict[str, float] | None:
    """Read a sensitivity file: a JSON object of tensor name or glob -> positive multiplier (the
    ``sensitivity`` argument of :func:`prepare_model`; ``Sensitivity.to_json`` writes it)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"sensitivity file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise PgolfError(f"cannot parse sensitivity file {path}: {e}") from None
    if not isinstance(d, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                          and math.isfinite(v) for v in d.values()):
        raise PgolfError(f"{path}: expected a JSON object of tensor name or glob -> positive number")
    return {str(k): float(v) for k, v in d.items()}


def slope_constant(w: np.ndarray, prep: PreparedHessian | None, row_mode: str, col_beta: float) -> float:
    base = row_base(w, row_mode)
    k_rows = float(np.mean(base * base))
    if prep is None:
        return k_rows
    ew = column_weights(prep)
    g = col_multipliers(col_exponents(ew, col_beta)).astype(np.float64) if col_beta else np.ones_like(ew)
    return k_rows * float(np.mean(ew * g * g))


def prepare_model(
    tensors: Mapping[str, torch.Tensor],
    hessians: Mapping[str, np.ndarray] | None,
    cfg: RDConfig,
    counts: Mapping[str, int] | None = None,
    sensitivity: Mapping[str, float] | None = None,
    device: "str | torch.device | None" = None,
) -> ModelPrep:
    """Factorise each Hessian once (on ``device``, the CPU by default) and store the float tensors.
    Without Hessians the matrices are rounded without GPTQ feedback and without column
    multipliers (``col_beta`` is ignored)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    check_finite(tensors)
    infos, passthrough = [], {}
    for name, t in tensors.items():
        if not is_quantizable(t, cfg.min_numel):
            passthrough[name] = store_float(name, t, as_fp16=cfg.passthrough == "fp16")
            continue
        w = to_float32(t)
        h = prep = None
        if hessians is not None:
            if name not in hessians:
                raise PgolfError(f"the Hessian file has no entry for {name}")
            n = max(int((counts or {}).get(name, 1)), 1)
            h = check_hessian(name, hessians[name], w.shape[1]).astype(np.float64) / n
            prep = prepare_hessian(h, cfg.damp, cfg.act_order, name, dev)
        k = slope_constant(w, prep, cfg.row_mode, cfg.col_beta if prep is not None else 0.0)
        infos.append(TensorInfo(name, w, dtype_name(t.dtype), prep, h, sensitivity_of(name, sensitivity), k))
    return ModelPrep(infos, passthrough, list(tensors), cfg, dev)


def step_for(info: TensorInfo, lam: float, alloc: str = "slope") -> float:
    """The step multiple Δ_t that puts matrix t at slope λ (high-rate rule); with ``uniform``
    allocation every matrix gets Δ = √(6λ/ln2), as if K_t·sens_t were 1."""
    if not (lam > 0 and np.isfinite(lam)):
        raise PgolfError(f"lambda must be a positive number, got {lam}")
    if alloc == "uniform":
        return math.sqrt(SLOPE * lam)
    return math.sqrt(SLOPE * lam / max(info.k * info.sens, 1e-300))


def allocate_steps(mp: ModelPrep, lam: float) -> dict[str, float]:
    return {t.name: step_for(t, lam, mp.cfg.alloc) for t in mp.tensors}


def quantize_matrix(info: TensorInfo, delta: float, lam: float, cfg: RDConfig,
                    device: "str | torch.device | None" = None) -> QuantizedTensor:
    """One matrix with the configured method at step multiple ``delta`` and slope ``lam``, swept on
    ``device`` (default: where its prepared Hessian lives, else the CPU)."""
    prep = info.prep
    beta = cfg.col_beta if prep is not None else 0.0
    if cfg.alloc == "slope":
        lam_t = cfg.rdoq_gain * lam / info.sens
    else:  # the matrix's own slope at its step
        from .rdoq import natural_lambda

        lam_t = cfg.rdoq_gain * natural_lambda(info.grid(delta, cfg), prep)
    if cfg.method == "trellis":
        from .trellis import quantize_trellis

        return quantize_trellis(info.name, info.w, info.dtype, delta, lam_t, prep, cfg.row_mode, beta,
                                states=cfg.trellis_states, iters=cfg.iters, coding=cfg.trellis_coding,
                                block_size=cfg.block_size, device=device)
    grid = info.grid(delta, cfg)
    params: dict = {"gptq": prep is not None, "lambda": float(lam)}
    if cfg.method == "rdoq":
        q, _ = rdoq_codes(info.w, grid, prep, lam_t, cfg.iters, cfg.rate_model, cfg.block_size, name=info.name,
                          device=device)
        params["rdoq"] = {"lambda": float(lam_t), "iters": int(cfg.iters), "model": cfg.rate_model}
    else:
        q = ecsq_codes(info.w, grid, prep, block_size=cfg.block_size, name=info.name, device=device)
    return make_ecsq_tensor(info.name, info.w.shape, info.dtype, q, grid, params)


def quantize_model_rd(mp: ModelPrep, lam: float, steps: Mapping[str, float] | None = None,
                      on_tensor: Callable[[str], None] | None = None) -> QuantizedModel:
    """Quantize every matrix at slope ``lam`` (steps from :func:`allocate_steps` unless given)."""
    steps = dict(steps) if steps is not None else allocate_steps(mp, lam)
    done: dict[str, QuantizedTensor] = dict(mp.passthrough)
    for info in mp.tensors:
        done[info.name] = quantize_matrix(info, steps[info.name], lam, mp.cfg, mp.device)
        if on_tensor:
            on_tensor(info.name)
    meta = {"pgolf_pack": __version__, "rd": {"lambda": float(lam), **mp.cfg.to_dict()}}
    return QuantizedModel([done[n] for n in mp.order], meta)


def proxy_error(mp: ModelPrep, qm: QuantizedModel) -> dict[str, float]:
    """Per-matrix loss proxy ``sens · trace(ΔW H ΔWᵀ)`` (count-normalised H)."""
    from .base import dequantize_float32
    from .gptq import hessian_error

    out = {}
    for info in mp.tensors:
        if info.h is None:
            continue
        out[info.name] = info.sens * hessian_error(info.w, dequantize_float32(qm[info.name]), info.h)
    return out


# --- a starting λ for the budget search (rd_search.fit_budget) -------------------------------


def _rtn_bits(mp: ModelPrep, lam: float) -> float:
    """Order-0 entropy (bits) of round-to-nearest codes at slope λ: a cheap size probe."""
    bits = 0.0
    for info, (name, delta) in zip(mp.tensors, allocate_steps(mp, lam).items()):
        q = ecsq_codes(info.w, info.grid(delta, mp.cfg), None, device=mp.device)
        _, c = np.unique(q, return_counts=True)
        bits += float(-(c * np.log2(c / c.sum())).sum())
    return bits


def _initial_lambda(mp: ModelPrep, target: int, probes: int = 4) -> float:
    """A λ whose round-to-nearest order-0 size is near ``target`` bytes.

    Starts where the median matrix gets a step of 0.35 of its spread, then takes secant steps in
    log λ (at high rate each factor 4 in λ is one bit per weight); a probe whose rate has
    collapsed to ~0 bits only tells the direction, so it moves by a fixed factor instead."""
    n = sum(t.numel for t in mp.tensors)
    if n == 0:
        return 1.0
    side = sum(t.raw_bytes() for t in mp.passthrough.values()) + sum(2 * t.w.shape[0] for t in mp.tensors)
    want = max(8.0 * (target - side), 0.05 * n)
    ks = [1.0 if mp.cfg.alloc == "uniform" else t.k * t.sens for t in mp.tensors]
    x0 = math.log2(0.35**2 * float(np.median(ks)) / SLOPE)
    b0 = _rtn_bits(mp, 2.0**x0)
    slope = -0.5 * n  # bits per unit of log2 λ
    for _ in range(probes - 1):
        if b0 < 0.02 * n:
            x1 = x0 - 4.0
        else:
            x1 = x0 + float(np.clip((want - b0) / slope, -8.0, 8.0))
        b1 = _rtn_bits(mp, 2.0**x1)
        if abs(b1 - want) < 0.002 * want:
            return float(2.0**x1)
        if b0 >= 0.02 * n and b1 >= 0.02 * n and b1 != b0:
            slope = min((b1 - b0) / (x1 - x0), -0.05 * n)
        x0, b0 = x1, b1
    return float(2.0 ** (x0 + float(np.clip((want - b0) / slope, -8.0, 8.0))))
