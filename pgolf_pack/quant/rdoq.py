"""Rate-aware rounding inside GPTQ (RDOQ) on the ECSQ grid.

For each weight of the column being swept, GPTQ's rounding step picks the code minimising

    err_weight · (x - c·step)²  +  λ · bits(c)

over c ∈ {nearest, nearest moved one toward zero, 0}, where ``err_weight`` is the weight GPTQ's
objective gives that column's squared error and ``bits(c)`` comes from the entropy coder's own
fitted model of this tensor (:meth:`EntropyModel.value_costs`, the per-column parametric model by
default), so the rate term prices codes the way the coder will. The zero candidate makes the
dead-zone ("zero-or-quantize") a natural outcome instead of a fixed threshold. The model is
re-fitted on the codes of the previous pass (RTN codes seed the first), ``iters`` times.

λ is in units of the GPTQ objective per bit; with a count-normalised Hessian it is the same
currency for every matrix, which is what the equal-slope allocation (:mod:`.allocate`) needs.
At λ = 0 the choice is plain round-to-nearest (ties keep the nearest), so the result equals
plain GPTQ exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PgolfError
from ..coding.entropy import fit_models
from .base import QuantizedTensor
from .ecsq import EcsqGrid, as_prepared, ecsq_codes, make_ecsq_tensor, make_grid
from .gptq import PreparedHessian, check_weight, sweep_device

# Codes this far beyond the fitted range still get a finite price (escape-like growth).
RANGE_MARGIN = 64
RATE_MODELS = ("col", "hist", "row", "rc")


@dataclass
class RateTable:
    """Bits of value ``v`` at (row, col): ``costs[ctx[row, col], v - vmin]`` (finite everywhere)."""

    ctx: torch.Tensor  # (rows, cols) int64
    costs: torch.Tensor  # (K, V) float32
    vmin: int

    @property
    def vmax(self) -> int:
        return self.vmin + int(self.costs.shape[1]) - 1

    def to(self, device: "str | torch.device") -> "RateTable":
        """The same table on ``device`` (itself when it is already there)."""
        dev = torch.device(device)
        if self.costs.device == dev:
            return self
        return RateTable(self.ctx.to(dev), self.costs.to(dev), self.vmin)

    def column_costs(self, col: int) -> torch.Tensor:
        """(rows, V) bit costs for one column."""
        return self.costs[self.ctx[:, col]]

    def bits(self, codes: np.ndarray) -> float:
        """Total bits the table prices ``codes`` at (side information excluded)."""
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64)).to(self.costs.device)
        idx = (c.clamp(self.vmin, self.vmax) - self.vmin)
        return float(self.costs[self.ctx, idx].double().sum())


def fit_rate_table(codes: np.ndarray, model: str = "col") -> RateTable:
    """Fit the entropy coder's ``model`` to one tensor's codes and tabulate per-value bit costs."""
    if model not in RATE_MODELS:
        raise PgolfError(f"unknown rate model {model!r}; choose one of {', '.join(RATE_MODELS)}")
    q = np.asarray(codes, dtype=np.int64)
    if q.ndim != 2:
        raise PgolfError(f"rate model needs a 2-D code matrix, got shape {q.shape}")
    lo, hi = int(q.min()), int(q.max())
    vmin, vmax = lo - RANGE_MARGIN, hi + RANGE_MARGIN
    fit = fit_models([q], vmin, vmax, [model])[0]
    values = np.arange(vmin, vmax + 1)
    ctx, costs = fit.value_costs(0, values)
    costs = _finite_costs(costs, values)
    return RateTable(torch.from_numpy(ctx.astype(np.int64)), torch.from_numpy(costs.astype(np.float32)), vmin)


def _finite_costs(costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Replace the infinite costs of values the model's core cannot code by an escape-like price:
    the dearest codable value plus 2·log2 of the distance to the codable range, plus one."""
    out = np.array(costs, dtype=np.float64)
    fin = np.isfinite(out)
    for k in range(out.shape[0]):
        ok = np.flatnonzero(fin[k])
        if ok.size == 0:
            out[k] = 32.0 + 2 * np.log2(1 + np.abs(values))
            continue
        top = out[k, ok].max()
        lo_v, hi_v = values[ok[0]], values[ok[-1]]
        dist = np.where(values < lo_v, lo_v - values, np.where(values > hi_v, values - hi_v, 0))
        bad = ~fin[k]
        out[k, bad] = top + 1.0 + 2.0 * np.log2(1.0 + dist[bad])
    return out


def natural_lambda(grid: EcsqGrid, prep: PreparedHessian | None) -> float:
    """The slope (objective per bit) of ECSQ on ``grid`` at high rate: (ln2/6)·mean(ω_j·step_ij²).

    RDOQ at this λ trades error for bits at the rate the step itself does; a recipe's
    dimensionless ``rdoq`` gain multiplies it."""
    from .ecsq import column_weights

    steps = grid.steps().astype(np.float64)
    ew = column_weights(prep) if prep is not None else np.ones(steps.shape[1])
    return float(np.log(2.0) / 6.0 * np.mean(steps * steps * ew[None, :]))


class RdoqRound:
    """A GPTQ :class:`~.gptq.RoundFn` choosing among nearest / one toward zero / zero by D + λR."""

    def __init__(self, table: RateTable, lam: float):
        if not (np.isfinite(lam) and lam >= 0):
            raise PgolfError(f"RDOQ lambda must be a finite number >= 0, got {lam}")
        self.table = table
        self.lam = float(lam)

    def __call__(self, x: torch.Tensor, scale: torch.Tensor, *, qmax: int, col: int, err_weight: float) -> torch.Tensor:
        u = x / scale
        near = torch.clamp(torch.round(u), -qmax, qmax)
        cands = torch.stack([near, near - torch.sign(near), torch.zeros_like(near)])  # (3, rows)
        d = (u.unsqueeze(0) - cands) * scale.unsqueeze(0)
        cost = float(err_weight) * d * d
        if self.lam:
            if self.table.costs.device != x.device:
                self.table = self.table.to(x.device)  # once: later columns find it there
            t = self.table
            idx = (cands.to(torch.int64).clamp(t.vmin, t.vmax) - t.vmin).T  # (rows, 3)
            bits = torch.gather(t.column_costs(col), 1, idx).T.to(cost.dtype)
            cost = cost + self.lam * bits
        # argmin returns the first minimum, so a tie keeps the nearest code.
        pick = torch.argmin(cost, dim=0)
        return torch.gather(cands, 0, pick.unsqueeze(0)).squeeze(0)


def rdoq_codes(w: np.ndarray, grid: EcsqGrid, prep: PreparedHessian | None, lam: float, iters: int = 1,
               model: str = "col", block_size: int = 128, init: np.ndarray | None = None,
               name: str = "weight", device: "str | torch.device | None" = None) -> tuple[np.ndarray, RateTable]:
    """Codes after ``iters`` rate-aware passes; the first rate model is fitted to ``init`` (default:
    round-to-nearest codes on ``grid`` without error feedback, which is cheap and close enough).

    The sweeps run on ``device`` (default: where ``prep`` lives, else the CPU); the rate model is
    fitted in numpy on the CPU (the entropy coder's own fit) and its table moved to the device."""
    if iters < 1:
        raise PgolfError(f"RDOQ needs at least one pass, got iters={iters}")
    dev = sweep_device(device, prep)
    q = ecsq_codes(w, grid, None, name=name, device=dev) if init is None else np.asarray(init)
    table = fit_rate_table(q, model).to(dev)
    for it in range(iters):
        if it:
            table = fit_rate_table(q, model).to(dev)
        q = ecsq_codes(w, grid, prep, RdoqRound(table, lam), block_size=block_size, name=name, device=dev)
    return q, table


def quantize_ecsq_rdoq(
    name: str,
    w: np.ndarray,
    dtype: str,
    delta: float,
    lam: float,
    H: np.ndarray | PreparedHessian | None = None,
    row_mode: str = "std",
    col_beta: float = 0.0,
    iters: int = 1,
    model: str = "col",
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    device: "str | torch.device | None" = None,
) -> QuantizedTensor:
    """ECSQ with rate-aware rounding (GPTQ sweep when ``H`` is given) on ``device``; scheme "ecsq"."""
    w = check_weight(name, w)
    prep = as_prepared(name, w, H, damp, act_order, device)
    grid = make_grid(w, delta, prep, row_mode, col_beta)
    q, _ = rdoq_codes(w, grid, prep, lam, iters, model, block_size, name=name, device=device)
    params = {"gptq": prep is not None, "rdoq": {"lambda": float(lam), "iters": int(iters), "model": model}}
    if prep is not None:
        params.update(block_size=int(block_size), damp=float(prep.damp), act_order=bool(prep.act_order))
    return make_ecsq_tensor(name, w.shape, dtype, q, grid, params)
