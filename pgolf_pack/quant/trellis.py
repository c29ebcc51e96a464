"""Trellis-coded (dependent) quantization inside the GPTQ sweep (scheme "dq").

Two interleaved scalar quantizers share one unit step s (= ``DQ_STEP_RATIO`` × the ECSQ step of
:mod:`.ecsq`): Q0 reconstructs the even multiples 2k·s, Q1 the odd ones and zero, (2k - sgn k)·s.
Which quantizer codes the next weight is set by a 4-state machine driven by the parity of the
level just coded (states 0, 1 → Q0; 2, 3 → Q1; next = ``TRANS[state][k & 1]``), so the union of
reconstruction points is as dense as a step-s quantizer while each level only indexes a step-2s
one. A Viterbi search picks the level sequence minimising D + λR over the whole trellis; the
packing gain of the trellis over a scalar grid is what lifts the rate–distortion curve above
entropy-coded scalar quantization. Decoding needs only the state machine and the levels.

Sources: trellis-coded quantization, Marcellin & Fischer, IEEE Trans. Commun. 38(1), 1990;
dependent quantization in VVC, Schwarz et al., "Hybrid video coding with trellis-coded
quantization", DCC 2019, and H.266/VVC (same state machine as here); for neural-network weights
in MPEG NNR, Haase et al., "Dependent scalar quantization for neural network compression",
ICIP 2020 (−5.8 % bitrate).

Where the trellis runs, and why. GPTQ rounds one column at a time and pushes each column's error
onto later columns, so a trellis along a row could not see the compensated values of columns not
yet swept. For a fixed column, though, GPTQ's objective is a sum over rows with one weight
``err_weight`` (rows are independent), so the trellis runs down each **column** across the rows:
Viterbi on ``err_weight · s_i² · (u_i - m_i)² + λ · bits(k_i)`` is exact for that column, and the
sweep then propagates the chosen reconstruction's error as usual. Every column starts in state 0.

Coding the levels (``coding``):

* ``"plain"`` – one rows × cols symbols stream of levels; the packer's entropy coder then models
  it with its per-column contexts (the structure that pays most on these weights);
* ``"split"`` – the levels are split by the quantizer (state class) that coded them into two
  streams ``q.s0`` / ``q.s1`` in row-major scan order, so each class gets its own histogram.
  The decoder walks the rows, knows every column's state from the rows above, and takes each
  row's levels from the two streams in column order.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from ..errors import ArtifactError, PgolfError
from .base import QuantizedTensor, Stream, register_check, register_scheme
from .ecsq import CODE_MAX, EcsqGrid, as_prepared, check_codes, check_steps, entry_steps, make_grid, symbol_dtype
from .spec import Check
from .gptq import PreparedHessian, check_weight, gptq_sweep_range

SCHEME = "dq"
CODINGS = ("plain", "split")
STATES = 4
TRANS = np.array([[0, 2], [2, 0], [1, 3], [3, 1]], dtype=np.int64)
QSEL = np.array([0, 0, 1, 1], dtype=np.int64)
# Measured on the bench matrices: at this ratio the trellis lands at about ECSQ's Hessian-weighted
# error for the same Δ, so the equal-slope allocation can share one step rule.
DQ_STEP_RATIO = 0.6
RANGE_MARGIN = 32
_N_CAND = 5  # per state: four consecutive levels around the input, plus zero


# --- levels and reconstruction ------------------------------------------------------------------


def recon_of(k: np.ndarray, qclass: np.ndarray) -> np.ndarray:
    """Reconstruction index m (in units of s) of level k under quantizer ``qclass`` (0 or 1)."""
    k = np.asarray(k, dtype=np.int64)
    return np.where(np.asarray(qclass) == 0, 2 * k, 2 * k - np.sign(k))


def level_of(m: np.ndarray, qclass: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.int64)
    return np.where(np.asarray(qclass) == 0, m // 2, (m + np.sign(m)) // 2)


def walk_levels(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoder: (recon indices, state class) of a rows × cols level matrix, trellis down columns."""
    k = np.asarray(levels, dtype=np.int64)
    rows, cols = k.shape
    state = np.zeros(cols, np.int64)
    m = np.empty_like(k)
    cls = np.empty_like(k)
    for r in range(rows):
        q = QSEL[state]
        cls[r] = q
        m[r] = recon_of(k[r], q)
        state = TRANS[state, k[r] & 1]
    return m, cls


def levels_from_recon(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encoder: levels and state classes of a reconstruction matrix the trellis produced.

    Raises ValueError when some m is not on the quantizer its state selects (not a trellis path).
    """
    m = np.asarray(m, dtype=np.int64)
    rows, cols = m.shape
    state = np.zeros(cols, np.int64)
    k = np.empty_like(m)
    cls = np.empty_like(m)
    for r in range(rows):
        q = QSEL[state]
        kr = level_of(m[r], q)
        if not np.array_equal(recon_of(kr, q), m[r]):
            raise ValueError(f"row {r}: reconstruction is not on the trellis")
        cls[r], k[r] = q, kr
        state = TRANS[state, kr & 1]
    return k, cls


def split_by_class(levels: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The levels of each state class in row-major scan order."""
    k = np.asarray(levels).reshape(-1)
    c = np.asarray(cls).reshape(-1)
    return k[c == 0], k[c == 1]


def merge_classes(q0: np.ndarray, q1: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`split_by_class`: rebuild the level matrix by walking the state machine."""
    rows, cols = shape
    q0 = np.asarray(q0, dtype=np.int64).reshape(-1)
    q1 = np.asarray(q1, dtype=np.int64).reshape(-1)
    if q0.size + q1.size != rows * cols:
        raise ArtifactError(f"trellis streams hold {q0.size + q1.size} levels for a {rows}×{cols} matrix")
    k = np.empty((rows, cols), np.int64)
    state = np.zeros(cols, np.int64)
    p0 = p1 = 0
    for r in range(rows):
        c1 = QSEL[state] == 1
        n1 = int(c1.sum())
        n0 = cols - n1
        if p0 + n0 > q0.size or p1 + n1 > q1.size:
            raise ArtifactError("trellis streams are shorter than the state machine needs")
        row = np.empty(cols, np.int64)
        row[~c1] = q0[p0:p0 + n0]
        row[c1] = q1[p1:p1 + n1]
        p0 += n0
        p1 += n1
        k[r] = row
        state = TRANS[state, row & 1]
    return k


# --- Viterbi ---------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _recon1(k, q):
    if q == 0:
        return 2 * k
    if k > 0:
        return 2 * k - 1
    if k < 0:
        return 2 * k + 1
    return 0


@njit(cache=True, nogil=True)
def _viterbi_kernel(u, wd, lam, cost, ctx, vmin, trans, qsel, out_m, out_k):
    rows = u.size
    S = trans.shape[0]
    V = cost.shape[2]
    INF = 1e300
    J = np.full(S, INF)
    J[0] = 0.0
    Jn = np.empty(S)
    back_s = np.zeros((rows, S), np.int64)
    back_k = np.zeros((rows, S), np.int64)
    for r in range(rows):
        Jn[:] = INF
        ur = u[r]
        w = wd[r]
        cr = ctx[r]
        for s in range(S):
            if J[s] >= INF:
                continue
            qc = qsel[s]
            c = ur * 0.5
            if qc == 1:
                if ur > 0:
                    c += 0.5
                elif ur < 0:
                    c -= 0.5
            ka = np.int64(np.floor(c))
            for t in range(5):
                if t < 4:
                    k = ka - 1 + t
                else:
                    if ka - 1 <= 0 and 0 <= ka + 2:
                        continue
                    k = 0
                d = ur - _recon1(k, qc)
                tot = J[s] + w * d * d
                if lam > 0.0:
                    idx = k - vmin
                    if idx < 0:
                        idx = 0
                    elif idx >= V:
                        idx = V - 1
                    tot += lam * cost[qc, cr, idx]
                ns = trans[s, k & 1]
                if tot < Jn[ns]:
                    Jn[ns] = tot
                    back_s[r, ns] = s
                    back_k[r, ns] = k
        J[:] = Jn
    s = 0
    for i in range(1, S):
        if J[i] < J[s]:
            s = i
    for r in range(rows - 1, -1, -1):
        k = back_k[r, s]
        ps = back_s[r, s]
        out_k[r] = k
        out_m[r] = _recon1(k, qsel[ps])
        s = ps


def _check_viterbi_args(u, wd, cost, ctx):
    u = np.ascontiguousarray(u, dtype=np.float64).reshape(-1)
    wd = np.ascontiguousarray(wd, dtype=np.float64).reshape(-1)
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    ctx = np.ascontiguousarray(ctx, dtype=np.int64).reshape(-1)
    if wd.shape != u.shape or ctx.shape != u.shape:
        raise ValueError("u, wd and ctx must have the same length")
    if cost.ndim != 3 or cost.shape[0] != 2 or cost.shape[2] < 1:
        raise ValueError(f"cost must have shape (2, contexts, values), got {cost.shape}")
    if u.size and (ctx.min() < 0 or ctx.max() >= cost.shape[1]):
        raise ValueError("ctx indexes outside the cost table")
    if not np.all(np.isfinite(u)) or not np.all(np.isfinite(wd)):
        raise ValueError("trellis input contains NaN or Inf")
    return u, wd, cost, ctx


def viterbi_column(u: np.ndarray, wd: np.ndarray, lam: float, cost: np.ndarray, ctx: np.ndarray,
                   vmin: int) -> tuple[np.ndarray, np.ndarray]:
    """Best (recon indices, levels) for one column: minimise Σ wd·(u - m)² + λ·cost[class, ctx, k - vmin].

    ``u`` is the input in units of s, ``wd`` the weight of each squared error, ``cost`` bit costs
    per state class (2), context and level (levels outside the table take the nearest entry).
    """
    u, wd, cost, ctx = _check_viterbi_args(u, wd, cost, ctx)
    m = np.empty(u.size, np.int64)
    k = np.empty(u.size, np.int64)
    if u.size:
        _viterbi_kernel(u, wd, float(lam), cost, ctx, int(vmin), TRANS, QSEL, m, k)
    return m, k


def viterbi_column_ref(u: np.ndarray, wd: np.ndarray, lam: float, cost: np.ndarray, ctx: np.ndarray,
                       vmin: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference of :func:`viterbi_column` (same candidates, same tie-breaking)."""
    u, wd, cost, ctx = _check_viterbi_args(u, wd, cost, ctx)
    rows, S, V = u.size, STATES, cost.shape[2]
    J = np.full(S, np.inf)
    J[0] = 0.0
    back_s = np.zeros((rows, S), np.int64)
    back_k = np.zeros((rows, S), np.int64)
    for r in range(rows):
        # Candidate table in the kernel's visiting order: state-major, then candidate.
        c = u[r] * 0.5 + np.where(QSEL == 1, 0.5 * np.sign(u[r]), 0.0)
        ka = np.floor(c).astype(np.int64)
        ks = ka[:, None] - 1 + np.arange(4)[None, :]
        has0 = (ka - 1 <= 0) & (0 <= ka + 2)
        ks = np.concatenate([ks, np.zeros((S, 1), np.int64)], axis=1)
        valid = np.concatenate([np.ones((S, 4), bool), ~has0[:, None]], axis=1) & np.isfinite(J)[:, None]
        qc = np.broadcast_to(QSEL[:, None], ks.shape)
        d = u[r] - recon_of(ks, qc)
        tot = J[:, None] + wd[r] * d * d
        if lam > 0:
            tot = tot + lam * cost[qc, ctx[r], np.clip(ks - vmin, 0, V - 1)]
        ns = TRANS[np.arange(S)[:, None], ks & 1]
        Jn = np.full(S, np.inf)
        flat = [(s, t) for s in range(S) for t in range(_N_CAND)]
        for s, t in flat:
            if valid[s, t] and tot[s, t] < Jn[ns[s, t]]:
                Jn[ns[s, t]] = tot[s, t]
                back_s[r, ns[s, t]] = s
                back_k[r, ns[s, t]] = ks[s, t]
        J = Jn
    s = int(np.argmin(J))
    m = np.empty(rows, np.int64)
    k = np.empty(rows, np.int64)
    for r in range(rows - 1, -1, -1):
        k[r] = back_k[r, s]
        ps = back_s[r, s]
        m[r] = recon_of(k[r], QSEL[ps])
        s = ps
    return m, k


# --- rate tables -----------------------------------------------------------------------------------


def fit_trellis_rate(levels: np.ndarray, cls: np.ndarray, coding: str = "plain") -> tuple[np.ndarray, np.ndarray, int]:
    """(cost (2, K, V), ctx (rows, cols), vmin): bits of each level as the chosen ``coding`` will
    code it — the entropy coder's per-column model of the level matrix (``plain``), or one
    histogram per state class (``split``)."""
    from ..coding.entropy import fit_models
    from .rdoq import _finite_costs

    k = np.asarray(levels, dtype=np.int64)
    vmin, vmax = int(k.min()) - RANGE_MARGIN, int(k.max()) + RANGE_MARGIN
    values = np.arange(vmin, vmax + 1)
    if coding == "plain":
        fit = fit_models([k], vmin, vmax, ["col"])[0]
        ctx, costs = fit.value_costs(0, values)
        costs = _finite_costs(costs, values)
        return np.stack([costs, costs]), np.ascontiguousarray(ctx, dtype=np.int64), vmin
    if coding != "split":
        raise PgolfError(f"unknown trellis coding {coding!r}; choose one of {', '.join(CODINGS)}")
    tabs = []
    for q in (0, 1):
        sel = k[np.asarray(cls) == q]
        counts = np.bincount(sel - vmin, minlength=values.size).astype(np.float64) if sel.size else np.zeros(values.size)
        # Add-half smoothing keeps unseen levels finite but dear.
        p = (counts + 0.5) / (counts.sum() + 0.5 * values.size)
        tabs.append(-np.log2(p)[None, :])
    return np.stack(tabs), np.zeros(k.shape, np.int64), vmin


# --- the GPTQ rounding function --------------------------------------------------------------------


class TrellisRound:
    """A GPTQ :class:`~.gptq.RoundFn` running the Viterbi search down the column.

    Returns reconstruction indices m (the sweep propagates ``x - m·s``); the levels follow from m
    with :func:`levels_from_recon`.
    """

    def __init__(self, lam: float, cost: np.ndarray | None = None, ctx: np.ndarray | None = None, vmin: int = 0):
        if not (np.isfinite(lam) and lam >= 0):
            raise PgolfError(f"trellis lambda must be a finite number >= 0, got {lam}")
        if lam > 0 and cost is None:
            raise PgolfError("a trellis with lambda > 0 needs a rate table")
        self.lam = float(lam)
        self.cost = np.zeros((2, 1, 1)) if cost is None else np.ascontiguousarray(cost, dtype=np.float64)
        self.ctx = ctx
        self.vmin = int(vmin)

    def __call__(self, x: torch.Tensor, scale: torch.Tensor, *, qmax: int, col: int, err_weight: float) -> torch.Tensor:
        xs = x.double()
        sd = scale.double()
        # The Viterbi search is sequential down the rows and runs in numba on the CPU: on a CUDA
        # sweep each column makes this one round trip while the error feedback stays on the GPU.
        u = (xs / sd).cpu().numpy()
        wd = (float(err_weight) * sd * sd).cpu().numpy()
        ctx = np.zeros(u.size, np.int64) if self.ctx is None else np.ascontiguousarray(self.ctx[:, col], dtype=np.int64)
        m, _ = viterbi_column(u, wd, self.lam, self.cost, ctx, self.vmin)
        return torch.from_numpy(m).to(device=x.device, dtype=x.dtype)


def trellis_recon(w: np.ndarray, grid: EcsqGrid, prep: PreparedHessian | None, rnd: TrellisRound,
                  block_size: int = 128, name: str = "weight", device: "str | torch.device | None" = None) -> np.ndarray:
    """Reconstruction indices (int64) on the trellis: GPTQ sweep with ``prep`` (on ``device``,
    default where ``prep`` lives), else column by column without error feedback — that path is
    all Viterbi, which runs on the CPU, so it stays there whatever ``device`` says."""
    if prep is not None:
        return gptq_sweep_range(w, prep, grid.scale, CODE_MAX, block_size=block_size, round_fn=rnd, name=name,
                                col_mult=grid.col_mult, device=device).astype(np.int64)
    s = torch.from_numpy(grid.scale.astype(np.float32))
    mult = grid.col_mult
    out = np.empty(w.shape, np.int64)
    for j in range(w.shape[1]):
        sj = s if mult is None else s * float(mult[j])
        out[:, j] = rnd(torch.from_numpy(np.ascontiguousarray(w[:, j])), sj, qmax=CODE_MAX, col=j, err_weight=1.0).numpy()
    return out


def trellis_levels(w: np.ndarray, grid: EcsqGrid, prep: PreparedHessian | None, lam: float, iters: int = 1,
                   coding: str = "plain", block_size: int = 128, name: str = "weight",
                   device: "str | torch.device | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(levels, recon indices) after ``iters`` rate-aware trellis passes. The first rate model is
    fitted to a distortion-only trellis without error feedback (cheap); at λ = 0 no model is fitted."""
    if coding not in CODINGS:
        raise PgolfError(f"unknown trellis coding {coding!r}; choose one of {', '.join(CODINGS)}")
    if iters < 1:
        raise PgolfError(f"the trellis needs at least one pass, got iters={iters}")
    if lam == 0:
        m = trellis_recon(w, grid, prep, TrellisRound(0.0), block_size, name, device)
        return levels_from_recon(m)[0], m
    m = trellis_recon(w, grid, None, TrellisRound(0.0), block_size, name)
    for _ in range(iters):
        k, cls = levels_from_recon(m)
        cost, ctx, vmin = fit_trellis_rate(k, cls, coding)
        m = trellis_recon(w, grid, prep, TrellisRound(lam, cost, ctx, vmin), block_size, name, device)
    return levels_from_recon(m)[0], m


def make_dq_tensor(name: str, shape, dtype: str, levels: np.ndarray, grid: EcsqGrid, coding: str, params: dict) -> QuantizedTensor:
    k = np.asarray(levels, dtype=np.int64)
    streams: dict[str, Stream] = {}
    if coding == "plain":
        lo, hi = (int(k.min()), int(k.max())) if k.size else (0, 0)
        streams["q"] = Stream(k.astype(symbol_dtype(lo, hi)), "symbols", lo, hi)
    else:
        _, cls = walk_levels(k)
        for i, part in enumerate(split_by_class(k, cls)):
            lo, hi = (int(part.min()), int(part.max())) if part.size else (0, 0)
            streams[f"q.s{i}"] = Stream(part.astype(symbol_dtype(lo, hi)), "symbols", lo, hi)
    streams["scale"] = Stream(grid.scale.astype(np.float16), "side")
    if grid.col_exp is not None:
        e = grid.col_exp.astype(np.int8)
        streams["colexp"] = Stream(e, "symbols", int(e.min()), int(e.max()))
    p = {"method": "trellis", "states": STATES, "coding": coding, "delta": grid.delta, "row_mode": grid.row_mode,
         "col_beta": grid.col_beta, **params}
    # Sorted stream names: the manifest stores them sorted, so unpack → repack keeps the group order.
    return QuantizedTensor(name=name, shape=tuple(shape), dtype=dtype, scheme=SCHEME, params=p,
                           streams=dict(sorted(streams.items())))


def quantize_trellis(
    name: str,
    w: np.ndarray,
    dtype: str,
    delta: float,
    lam: float,
    H: np.ndarray | PreparedHessian | None = None,
    row_mode: str = "std",
    col_beta: float = 0.0,
    states: int = STATES,
    iters: int = 1,
    coding: str = "plain",
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    device: "str | torch.device | None" = None,
) -> QuantizedTensor:
    """Trellis-quantize one matrix; ``delta`` is the ECSQ-equivalent step (unit step = 0.6 Δ).
    The GPTQ sweep runs on ``device``; the Viterbi search on the CPU."""
    if states != STATES:
        raise PgolfError(f"only the {STATES}-state trellis is implemented, got states={states}")
    w = check_weight(name, w)
    prep = as_prepared(name, w, H, damp, act_order, device)
    grid = make_grid(w, DQ_STEP_RATIO * delta, prep, row_mode, col_beta)
    grid.delta = float(delta)
    k, _ = trellis_levels(w, grid, prep, lam, iters, coding, block_size, name, device)
    params = {"gptq": prep is not None, "lambda": float(lam), "step_ratio": DQ_STEP_RATIO}
    if prep is not None:
        params.update(block_size=int(block_size), damp=float(prep.damp), act_order=bool(prep.act_order))
    return make_dq_tensor(name, w.shape, dtype, k, grid, coding, params)


def dq_levels(qt: QuantizedTensor) -> np.ndarray:
    """The level matrix of a "dq" tensor, from whichever coding it was stored in."""
    rows = qt.shape[0]
    cols = qt.numel // max(rows, 1)
    coding = qt.params.get("coding", "plain")
    if int(qt.params.get("states", STATES)) != STATES:
        raise ArtifactError(f"tensor {qt.name}: trellis with {qt.params.get('states')} states is not supported")
    if coding == "plain":
        return qt.streams["q"].data.reshape(rows, cols).astype(np.int64)
    if coding == "split":
        return merge_classes(qt.streams["q.s0"].data, qt.streams["q.s1"].data, (rows, cols))
    raise ArtifactError(f"tensor {qt.name}: unknown trellis coding {coding!r}")


@register_scheme(SCHEME)
def dequantize_dq(qt: QuantizedTensor) -> np.ndarray:
    m, _ = walk_levels(dq_levels(qt))
    return m.astype(np.float32) * entry_steps(qt.streams["scale"].data, qt.streams["colexp"].data if "colexp" in qt.streams else None)


@register_check(SCHEME)
def check_dq(c: Check) -> None:
    rows, cols = c.matrix()
    if c.int_param("states", STATES, STATES) != STATES:
        c.fail(f"trellis with {c.spec.params['states']} states is not supported")
    if c.choice_param("coding", CODINGS, default="plain") == "plain":
        check_codes(c, "q", (rows, cols))
    elif check_codes(c, "q.s0", None) + check_codes(c, "q.s1", None) != rows * cols:
        c.fail(f"its two level streams do not hold the {rows}×{cols} levels of the matrix")
    check_steps(c, rows, cols)
