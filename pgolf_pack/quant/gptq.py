"""Full-Hessian GPTQ onto the per-row int-k grid of :mod:`.rtn` (scheme "intk").

The per-row scales are fixed before the sweep (``choose_scales``, Hessian-diagonal weighted when it
searches); the sweep then rounds one column at a time and pushes each column's rounding error onto
the not-yet-rounded columns through the upper Cholesky factor of H⁻¹, in lazy blocks. Output has
exactly the RTN layout, so packers and the dequantizer are shared.

Conventions, as in the records: H = Σ xᵀx of the layer input (sum or mean: damping is relative to
the mean diagonal, so only the ratio matters); damping adds ``damp · mean(diag H)``; act-order
processes columns by descending diag(H) and the symbols are stored back in original column order;
a dead column (diag 0: its input is always zero) gets H_ii = 1 and weight 0.

The per-column rounding is a swappable :class:`RoundFn` so other quantizers (rate-aware rounding)
can reuse the sweep.

Device: the factorization and the sweep run where ``device`` says (``prepare_hessian`` keeps the
factor there, and a sweep without an explicit device follows its :class:`PreparedHessian`); only
the finished codes come back to numpy. On CPU the results are the same bits as ever; on CUDA the
float32 matmuls of the error feedback may round differently in the last bits, so a few codes at a
rounding boundary can differ from a CPU run.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from ..errors import PgolfError
from .base import QuantizedTensor
from .rtn import choose_scales, make_intk_tensor, qmax

# Damping grows ×10 per failed Cholesky up to this fraction of the mean diagonal.
MAX_DAMP = 1.0


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded: the sweep is thousands of tiny ops, where intra-op threads only
    add sync cost, and on a busy machine their spin-waits made it 10-100x slower. Reference-counted
    so concurrent callers (one matrix per Python thread) restore the setting once, at the end."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def _threads_for(device: torch.device):
    """Single-threaded torch is a CPU concern; a CUDA sweep leaves the host setting alone."""
    return _one_thread() if device.type == "cpu" else contextlib.nullcontext()


def sweep_device(device: "str | torch.device | None", prep: "PreparedHessian | None" = None) -> torch.device:
    """Where a sweep runs: ``device`` when given, else where ``prep``'s factor lives, else the CPU."""
    if device is not None:
        return torch.device(device)
    return prep.u.device if prep is not None else torch.device("cpu")


class RoundFn(Protocol):
    def __call__(self, x: torch.Tensor, scale: torch.Tensor, *, qmax: int, col: int, err_weight: float) -> torch.Tensor:
        """Integer codes (as floats) for one error-compensated column ``x`` (rows,).

        ``col`` is the original column index; ``err_weight`` = 1/[H⁻¹]_jj is the Hessian weight
        that the column's squared rounding error carries in the GPTQ objective.
        """
        ...


def round_nearest(x: torch.Tensor, scale: torch.Tensor, *, qmax: int, col: int, err_weight: float) -> torch.Tensor:
    # torch.round is round-half-to-even like np.rint, so H = I reproduces RTN exactly.
    return torch.clamp(torch.round(x / scale), -qmax, qmax)


@dataclass
class PreparedHessian:
    """A damped, permuted Hessian factorized once and reusable for several sweeps."""

    u: torch.Tensor  # upper Cholesky factor of H⁻¹ in sweep (permuted) order, float64
    perm: torch.Tensor  # sweep position -> original column
    dead: np.ndarray  # bool per original column
    damp: float  # the damping fraction that made the factorization succeed
    diag: np.ndarray  # undamped diag(H) in original column order (the clip search's column weights)
    act_order: bool

    @property
    def cols(self) -> int:
        return int(self.u.shape[0])

    @property
    def device(self) -> torch.device:
        return self.u.device


def check_weight(name: str, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise PgolfError(f"{name}: GPTQ needs a 2-D weight, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise PgolfError(f"{name} contains NaN or Inf")
    return w


def check_hessian(name: str, h: np.ndarray, cols: int) -> np.ndarray:
    h = np.asarray(h)
    if h.shape != (cols, cols):
        raise PgolfError(f"Hessian for {name} has shape {tuple(h.shape)}, expected ({cols}, {cols}) (in_features²)")
    if not np.all(np.isfinite(h)):
        raise PgolfError(f"Hessian for {name} contains NaN or Inf")
    return h


def prepare_hessian(h: np.ndarray, damp: float = 0.01, act_order: bool = True, name: str = "weight",
                    device: "str | torch.device | None" = None) -> PreparedHessian:
    """Dampen, permute and factorize H (on ``device``, the CPU by default; the factor stays there);
    raises PgolfError when no damping up to MAX_DAMP works."""
    if damp < 0:
        raise PgolfError(f"damp must be >= 0, got {damp}")
    h = np.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise PgolfError(f"Hessian for {name} has shape {tuple(h.shape)}; expected a square in_features² matrix")
    h = check_hessian(name, h, h.shape[0])
    h64 = np.asarray(h, dtype=np.float64)
    hs = h64 + h64.T  # accumulated sums can be asymmetric in the last bits
    hs *= 0.5
    dead = np.diagonal(hs) == 0
    col_diag = np.clip(np.diagonal(hs), 0, None)  # a copy; a negative entry fails the factorization below
    if dead.any():
        hs[dead, :] = 0
        hs[:, dead] = 0
        hs[dead, dead] = 1.0
    n = hs.shape[0]
    # Stable sort on the negated diagonal: descending, ties keep their original order.
    perm = np.argsort(-np.diagonal(hs), kind="stable") if act_order else np.arange(n)
    if act_order:
        hs = hs[np.ix_(perm, perm)]
    dev = sweep_device(device)
    ht = torch.from_numpy(np.ascontiguousarray(hs)).to(dev)
    mean_diag = float(np.diagonal(hs).mean())
    d = damp if damp > 0 else 0.0
    applied = 0.0
    with _threads_for(dev):
        while True:
            ht.diagonal().add_((d - applied) * mean_diag)
            applied = d
            u, ok = _chol_inverse_upper(ht)
            if ok:
                return PreparedHessian(u=u, perm=torch.from_numpy(perm), dead=dead.copy(), damp=d, diag=col_diag, act_order=act_order)
            nxt = d * 10 if d > 0 else 0.01
            if nxt > MAX_DAMP * (1 + 1e-9):
                raise PgolfError(f"Hessian for {name} is not positive definite even with damp={d:g}")
            d = nxt


def _chol_inverse_upper(h: torch.Tensor) -> tuple[torch.Tensor, bool]:
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return h, False
    hinv = torch.cholesky_inverse(lower)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(u).all()):
        return h, False
    return u, True


def gptq_sweep(
    w: np.ndarray,
    h: np.ndarray | PreparedHessian,
    scales: np.ndarray,
    bits: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    round_fn: RoundFn = round_nearest,
    name: str = "weight",
    sweep_dtype: torch.dtype = torch.float32,
    device: "str | torch.device | None" = None,
) -> np.ndarray:
    """GPTQ symbols (int8, original column order) for ``w`` with fixed per-row ``scales``.

    ``h`` is H (cols × cols) or a :class:`PreparedHessian` (``damp``/``act_order`` then unused).
    ``device``: where the sweep runs (default: where a prepared Hessian lives, else the CPU).
    """
    w = check_weight(name, w)
    if block_size < 1:
        raise PgolfError(f"block_size must be >= 1, got {block_size}")
    rows, cols = w.shape
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(check_hessian(name, h, cols), damp, act_order, name,
                                                                     device)
    if prep.cols != cols:
        raise PgolfError(f"Hessian for {name} is {prep.cols}×{prep.cols}, expected {cols}×{cols}")
    r = qmax(bits)
    s = torch.from_numpy(np.asarray(scales, dtype=np.float32).reshape(-1).copy()).to(sweep_dtype)
    if s.shape[0] != rows:
        raise PgolfError(f"{name}: {s.shape[0]} scales for {rows} rows")

    dev = sweep_device(device, prep)
    with _threads_for(dev):
        q = _sweep(w, prep, s, r, block_size, round_fn, sweep_dtype, device=dev)
    return q


def _sweep(w, prep: PreparedHessian, s: torch.Tensor, r: int, block_size: int, round_fn: RoundFn, sweep_dtype,
           out_dtype: torch.dtype = torch.int8, col_mult: np.ndarray | None = None,
           device: torch.device | None = None) -> np.ndarray:
    rows, cols = w.shape
    dev = sweep_device(device, prep)
    # Optional per-column step multipliers (original column order): column j uses step s * col_mult[j].
    mult = None if col_mult is None else np.asarray(col_mult, dtype=np.float64)[prep.perm.numpy()].tolist()
    # Columns are swept as contiguous rows of the transposed weight.
    perm = prep.perm.to(dev)
    wt = torch.from_numpy(np.array(w.T, order="C")).to(dev)[perm].to(sweep_dtype).contiguous()
    dead_sweep = prep.dead[prep.perm.numpy()]
    if dead_sweep.any():
        wt[torch.from_numpy(np.flatnonzero(dead_sweep)).to(dev)] = 0
    u = prep.u.to(device=dev, dtype=sweep_dtype)
    s = s.to(dev)
    # Python floats and ints for the per-column loop: one transfer here instead of one per column.
    udiag = torch.diagonal(prep.u).tolist()
    perm_list = prep.perm.tolist()
    q = torch.empty((cols, rows), dtype=sweep_dtype, device=dev)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        blk = wt[i1:i2]  # a view: updates land in wt directly
        err = torch.empty((i2 - i1, rows), dtype=sweep_dtype, device=dev)
        u_blk = u[i1:i2, i1:i2]
        for k in range(i2 - i1):
            j = i1 + k
            x = blk[k]
            d = udiag[j]
            sj = s if mult is None else s * mult[j]
            qc = round_fn(x, sj, qmax=r, col=perm_list[j], err_weight=1.0 / (d * d))
            q[j] = qc
            e = err[k]
            torch.sub(x, qc * sj, out=e)
            e.div_(d)
            if k + 1 < i2 - i1:
                blk[k + 1 :].addr_(u_blk[k, k + 1 :], e, alpha=-1.0)
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)

    if q.numel() and not bool((q.abs() <= r).all()):  # checked before the int8 cast could wrap
        raise ValueError(f"round_fn returned codes outside [-{r}, {r}]")
    out = torch.empty_like(q)
    out[perm] = q
    return np.ascontiguousarray(out.round().to(out_dtype).cpu().numpy().T)


def gptq_sweep_range(
    w: np.ndarray,
    h: np.ndarray | PreparedHessian,
    scales: np.ndarray,
    code_max: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    round_fn: RoundFn = round_nearest,
    name: str = "weight",
    sweep_dtype: torch.dtype = torch.float32,
    col_mult: np.ndarray | None = None,
    device: "str | torch.device | None" = None,
) -> np.ndarray:
    """Like :func:`gptq_sweep` but with codes in ``[-code_max, code_max]`` (int32, no int-k grid)
    and optional per-column step multipliers: entry (i, j) of the result stands for
    ``code * scales[i] * col_mult[j]``."""
    w = check_weight(name, w)
    if block_size < 1:
        raise PgolfError(f"block_size must be >= 1, got {block_size}")
    if not 1 <= int(code_max) < 2**31:
        raise PgolfError(f"code_max must be in 1..2^31-1, got {code_max}")
    rows, cols = w.shape
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(check_hessian(name, h, cols), damp, act_order, name,
                                                                     device)
    if prep.cols != cols:
        raise PgolfError(f"Hessian for {name} is {prep.cols}×{prep.cols}, expected {cols}×{cols}")
    s = torch.from_numpy(np.asarray(scales, dtype=np.float32).reshape(-1).copy()).to(sweep_dtype)
    if s.shape[0] != rows:
        raise PgolfError(f"{name}: {s.shape[0]} scales for {rows} rows")
    if col_mult is not None and np.asarray(col_mult).shape != (cols,):
        raise PgolfError(f"{name}: {np.asarray(col_mult).shape} column multipliers for {cols} columns")
    dev = sweep_device(device, prep)
    with _threads_for(dev):
        return _sweep(w, prep, s, int(code_max), block_size, round_fn, sweep_dtype, torch.int32, col_mult, dev)


def hessian_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """trace(ΔW H ΔWᵀ): the layer-output squared error summed over the calibration inputs."""
    dw = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float(np.einsum("ij,ij->", dw @ np.asarray(h, dtype=np.float64), dw))


def gptq_quantize(
    name: str,
    w: np.ndarray,
    dtype: str,
    H: np.ndarray | PreparedHessian,
    bits: int,
    clip: str = "sdclip",
    sigmas: float | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    device: "str | torch.device | None" = None,
) -> QuantizedTensor:
    """GPTQ-quantize one matrix to per-row int-k (scheme "intk", method "gptq").

    ``H`` may be a :class:`PreparedHessian` to share one factorization between layers that read
    the same input (c_q, c_k, c_v); ``damp`` and ``act_order`` are then taken from it.
    """
    w = check_weight(name, w)
    if isinstance(H, PreparedHessian):
        prep = H
        if prep.cols != w.shape[1]:
            raise PgolfError(f"Hessian for {name} is {prep.cols}×{prep.cols}, expected {w.shape[1]}×{w.shape[1]}")
        act_order = prep.act_order
    else:
        prep = prepare_hessian(check_hessian(name, H, w.shape[1]), damp, act_order, name, device)
    scale, info = choose_scales(w, bits, clip, sigmas, prep.diag)
    q = gptq_sweep(w, prep, scale, bits, block_size=block_size, name=name, device=device)
    params = {"method": "gptq", **info, "block_size": int(block_size), "damp": float(prep.damp), "act_order": bool(act_order)}
    return make_intk_tensor(name, w.shape, dtype, q, scale, bits, params)
