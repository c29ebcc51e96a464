"""E8P: QuIP#'s 2-bit lattice codebook (2^16 points of E8 + 1/4) with RHT and BlockLDLQ.

Codebook (index-compatible with QuIP#'s E8P12, codebook version 1). ``B`` holds 256 magnitude
patterns: the 227 distinct |x| of points x in D8^ = D8 + 1/2 (half-integer coordinates, even sum)
with |x|^2 <= 10, sorted lexicographically, then 29 fixed patterns with three 1/2 and five 3/2.
A pattern b takes the 128 sign vectors whose number of negatives has the parity of sum(b) (so the
point lies in D8^), and the whole set is shifted by +1/4 or -1/4: 256 * 128 * 2 = 2^16 codewords,
all in E8 + 1/4. A 16-bit code is ``abs_index << 8 | sign_byte``: the sign byte's parity selects the
shift (odd: -1/4) and its bits, read through the coordinate permutation [0,2,4,6,1,3,5,7], flip
signs relative to b' (b with coordinate 7 negated when sum(b) is odd) — see :func:`decode_codes`.

Encoder: exact nearest codeword. For each shift branch y = x -+ 1/4 and each pattern b, the best
admissible sign vector is sign(y) with, if the parity is wrong, the coordinate of least b_i|y_i|
flipped; the full squared distance then picks pattern and branch (2 x 256 x 8 MACs per 8 weights).

Tensor path (:func:`quantize_e8p`): divide each row by its RMS (or the tensor by its RMS), rotate
both sides with the RHT, pad the rotated columns to a multiple of 8 (pad recorded, decoded and
dropped; any column count works), multiply by a searched multiplier ``alpha`` (MSE-optimal for a
unit Gaussian is ~1.03), round each 8-block (nearest, or BlockLDLQ with the rotated Hessian), then
refit the fp16 scale per row (or per tensor) by least squares in the original basis. The scale
lives in the original row basis, so ``W ≈ diag(scale) · RHT^-1(codebook[codes])``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import numba
import numpy as np

from ..errors import ArtifactError, PgolfError
from .base import QuantizedTensor, Stream, dequantize_float32, register_check, register_scheme
from .hadamard import RHT, hadamard_blocks
from .spec import Check
from .rtn import FP16_MAX

CODEBOOK_NAME = "e8p12"
CODEBOOK_VERSION = 1
DIM = 8
NUM_CODES = 1 << 16
PERM = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble/sign bit j holds coordinate PERM[j]
INV_PERM = np.argsort(PERM)
# Positions of the three 1/2 entries in QuIP#'s 29 padding patterns (the rest are 3/2), in order.
PAD_PATTERNS = (
    "123 023 013 012 367 357 347 356 346 345 267 257 247 256 246 245 167 157 147 156 146 045 067 "
    "057 047 056 046 014 237"
).split()
GAUSS_OPT_ALPHA = 1.03
SCALE_MODES = ("row", "tensor")
# Blocks used to search the scale multiplier; the optimum is a smooth function of alpha.
ALPHA_SAMPLE_BLOCKS = 8192


# ---------------------------------------------------------------------------------------------
# Codebook
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def abs_grid() -> np.ndarray:
    """The 256 x 8 magnitude patterns ``B`` in QuIP# order (float64, read-only)."""
    # Magnitude 7/2 alone already exceeds |x|^2 = 10, and every half-integer magnitude pattern
    # has admissible signs (one flip changes the sum's parity), so this enumerates the ball.
    mags = np.array(list(product((0.5, 1.5, 2.5), repeat=DIM)))
    ball = mags[(mags**2).sum(axis=1) <= 10.0]
    ball = np.unique(ball, axis=0)  # lexicographic, as torch.unique(dim=0)
    pad = np.full((len(PAD_PATTERNS), DIM), 1.5)
    for r, pos in enumerate(PAD_PATTERNS):
        pad[r, [int(c) for c in pos]] = 0.5
    grid = np.concatenate([ball, pad])
    grid.setflags(write=False)
    return grid


@lru_cache(maxsize=None)
def _grid_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = abs_grid()
    norms = (g**2).sum(axis=1)
    odd = (np.rint(g.sum(axis=1)).astype(np.int64) & 1).astype(np.int64)
    return np.ascontiguousarray(g), norms, odd


def packed_abs_words() -> np.ndarray:
    """QuIP#'s decoder word per pattern: nibble j = 2*b'[PERM[j]] + 8 (uint32)."""
    g, _, odd = _grid_tables()
    signed = g.copy()
    signed[:, 7] *= np.where(odd == 1, -1.0, 1.0)
    nib = (2 * signed[:, PERM] + 8).astype(np.uint64)
    return (nib << (4 * np.arange(DIM, dtype=np.uint64))).sum(axis=1).astype(np.uint32)


def decode_codes(codes: np.ndarray) -> np.ndarray:
    """Codeword(s) for 16-bit codes, following QuIP#'s decoder definition (float64, (..., 8))."""
    c = np.asarray(codes).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= NUM_CODES):
        raise ValueError("E8P codes must lie in 0..65535")
    words = packed_abs_words().astype(np.int64)[c >> 8]
    raw = c & 0xFF
    parity = np.zeros_like(raw)
    for j in range(DIM):
        parity ^= (raw >> j) & 1
    sgn = raw ^ parity
    out = np.empty(c.shape + (DIM,), dtype=np.float64)
    for i in range(DIM):
        j = int(INV_PERM[i])
        v = (((words >> (4 * j)) & 15) - 8) / 2.0
        out[..., i] = np.where((sgn >> j) & 1, -v, v)
    return out + np.where(parity, -0.25, 0.25)[..., None]


@lru_cache(maxsize=None)
def codebook() -> np.ndarray:
    """All 65,536 codewords, row = code (float64, read-only)."""
    cb = decode_codes(np.arange(NUM_CODES))
    cb.setflags(write=False)
    return cb


@lru_cache(maxsize=None)
def _codebook_f32() -> np.ndarray:
    cb = codebook().astype(np.float32)  # exact: multiples of 1/4 below 3
    cb.setflags(write=False)
    return cb


# ---------------------------------------------------------------------------------------------
# Nearest-codeword search
# ---------------------------------------------------------------------------------------------


def _code_from_choice(y_neg: np.ndarray, a: np.ndarray, flip: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """Code for sign(y) (with coordinate ``flip`` negated, -1 = none) on pattern ``a``, shift ``branch``."""
    _, _, odd = _grid_tables()
    neg = y_neg.astype(np.int64)
    has_flip = flip >= 0
    rows = np.nonzero(has_flip)[0]
    neg[rows, flip[rows]] ^= 1
    neg[:, 7] ^= odd[a]  # signs are stored relative to b', whose coordinate 7 is pre-negated
    sgn = np.zeros(len(a), dtype=np.int64)
    for i in range(DIM):
        sgn |= neg[:, i] << int(INV_PERM[i])
    raw = sgn ^ branch
    return ((a << 8) | raw).astype(np.uint16)


def nearest_numpy(x: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest E8P codeword for rows of ``x`` (N x 8): (codes uint16, codewords float64).

    Numpy reference of :func:`nearest`; float operations are ordered like the numba kernel so both
    return identical codes, ties included.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, DIM)
    g, gn, odd = _grid_tables()
    codes = np.empty(len(x), dtype=np.uint16)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        n = len(xs)
        best_d = np.full(n, np.inf)
        best = [np.zeros(n, np.int64) for _ in range(3)]  # pattern, flip, branch
        best_neg = np.zeros((n, DIM), dtype=bool)
        for branch, shift in ((0, 0.25), (1, -0.25)):
            y = xs - shift
            ay = np.abs(y)
            neg = y < 0
            negpar = neg.sum(axis=1) & 1
            ysq = y[:, 0] * y[:, 0]
            for i in range(1, DIM):
                ysq = ysq + y[:, i] * y[:, i]
            prods = g[None, :, :] * ay[:, None, :]  # (n, 256, 8)
            dot = prods[:, :, 0].copy()
            for i in range(1, DIM):
                dot = dot + prods[:, :, i]
            arg = prods.argmin(axis=2)
            mn = np.take_along_axis(prods, arg[:, :, None], axis=2)[:, :, 0]
            wrong = negpar[:, None] != odd[None, :]
            dot = np.where(wrong, dot - 2.0 * mn, dot)
            d = ysq[:, None] + gn[None, :] - 2.0 * dot
            a = d.argmin(axis=1)
            da = d[np.arange(n), a]
            better = da < best_d
            best_d = np.where(better, da, best_d)
            best[0] = np.where(better, a, best[0])
            best[1] = np.where(better, np.where(wrong[np.arange(n), a], arg[np.arange(n), a], -1), best[1])
            best[2] = np.where(better, branch, best[2])
            best_neg = np.where(better[:, None], neg, best_neg)
        codes[s : s + n] = _code_from_choice(best_neg, best[0], best[1], best[2])
    return codes, codebook()[codes]


@numba.njit(cache=True, nogil=True)
def _nearest_kernel(x, g, gn, odd, perm_inv, codes):  # pragma: no cover - compiled
    n = x.shape[0]
    y = np.empty(8)
    ay = np.empty(8)
    for r in range(n):
        best_d = np.inf
        best_a = 0
        best_flip = -1
        best_branch = 0
        best_negmask = 0
        for branch in range(2):
            shift = 0.25 if branch == 0 else -0.25
            negmask = 0
            negpar = 0
            ysq = 0.0
            for i in range(8):
                v = x[r, i] - shift
                y[i] = v
                ay[i] = abs(v)
                if v < 0:
                    negmask |= 1 << i
                    negpar ^= 1
            for i in range(8):
                ysq = ysq + y[i] * y[i]
            for a in range(256):
                dot = g[a, 0] * ay[0]
                mn = dot
                mi = 0
                for i in range(1, 8):
                    p = g[a, i] * ay[i]
                    dot = dot + p
                    if p < mn:
                        mn = p
                        mi = i
                flip = -1
                if negpar != odd[a]:
                    dot = dot - 2.0 * mn
                    flip = mi
                d = ysq + gn[a] - 2.0 * dot
                if d < best_d:
                    best_d = d
                    best_a = a
                    best_flip = flip
                    best_branch = branch
                    best_negmask = negmask
        neg = best_negmask
        if best_flip >= 0:
            neg ^= 1 << best_flip
        neg ^= odd[best_a] << 7
        sgn = 0
        for i in range(8):
            sgn |= ((neg >> i) & 1) << perm_inv[i]
        codes[r] = (best_a << 8) | (sgn ^ best_branch)


def nearest(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest E8P codeword for rows of ``x`` (N x 8): (codes uint16, codewords float64)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1, DIM))
    g, gn, odd = _grid_tables()
    codes = np.empty(len(x), dtype=np.int64)
    _nearest_kernel(x, g, gn, odd, INV_PERM.astype(np.int64), codes)
    codes16 = codes.astype(np.uint16)
    return codes16, codebook()[codes16]


def nearest_brute_force(x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """argmin over all 65,536 codewords (reference for tests): (codes, squared distances)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, DIM)
    cb = codebook()
    cn = (cb**2).sum(axis=1)
    codes = np.empty(len(x), dtype=np.uint16)
    dist = np.empty(len(x))
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        score = 2.0 * xs @ cb.T - cn[None, :]
        k = score.argmax(axis=1)
        codes[s : s + chunk] = k
        dist[s : s + chunk] = ((xs - cb[k]) ** 2).sum(axis=1)
    return codes, dist


# ---------------------------------------------------------------------------------------------
# Hessian-aware rounding (BlockLDLQ)
# ---------------------------------------------------------------------------------------------


def regularize_hessian(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Symmetrise, revive dead channels, normalise to unit mean diagonal, add ``damp`` * I."""
    h = np.asarray(h, dtype=np.float64)
    h = 0.5 * (h + h.T)
    d = np.diag(h).copy()
    dead = d <= 0
    # A channel that never fired carries no information; give it the typical live weight.
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    d[dead] = d[~dead].mean() if (~dead).any() else 1.0
    h[np.diag_indices_from(h)] = d
    mean = float(np.mean(np.diag(h)))
    h = h / mean
    h[np.diag_indices_from(h)] += damp
    return h


def _cholesky(h: np.ndarray) -> np.ndarray:
    extra = 0.0
    for _ in range(6):
        try:
            return np.linalg.cholesky(h + extra * np.eye(len(h)))
        except np.linalg.LinAlgError:
            extra = 1e-4 if extra == 0 else extra * 10
    raise PgolfError("Hessian is not positive definite even after damping; check the calibration data")


def block_ldl(h: np.ndarray, block: int = DIM) -> np.ndarray:
    """Unit block-lower-triangular L~ with H = L~ D L~^T (D block-diagonal, 8x8 blocks)."""
    L = _cholesky(h)
    n = len(h)
    if n % block:
        raise ValueError(f"Hessian size {n} is not a multiple of {block}")
    nb = n // block
    idx = np.arange(nb)
    diag_blocks = L.reshape(nb, block, nb, block)[idx, :, idx, :]  # (nb, 8, 8): L_kk
    cols = L.reshape(n, nb, block).transpose(1, 0, 2)  # (nb, n, 8): block columns
    return (cols @ np.linalg.inv(diag_blocks)).transpose(1, 0, 2).reshape(n, n)


def ldlq_round(x: np.ndarray, h: np.ndarray, buffer: int = 128) -> np.ndarray:
    """BlockLDLQ (last block first, as QuIP#): codes (m x n/8) for target ``x`` under metric ``h``."""
    m, n = x.shape
    lt = block_ldl(h)
    err = np.zeros_like(x)
    codes = np.empty((m, n // DIM), dtype=np.uint16)
    buffer = max(DIM, buffer - buffer % DIM)
    hi = n
    while hi > 0:
        lo = max(0, hi - buffer)
        # Feedback from blocks right of this buffer in one GEMM; inside it, block by block.
        u = x[:, lo:hi].copy()
        if hi < n:
            u += err[:, hi:] @ lt[hi:, lo:hi]
        for k in range(hi - DIM, lo - 1, -DIM):
            t = u[:, k - lo : k - lo + DIM]
            if k + DIM < hi:
                t = t + err[:, k + DIM : hi] @ lt[k + DIM : hi, k : k + DIM]
            c, v = nearest(t)
            codes[:, k // DIM] = c
            err[:, k : k + DIM] = x[:, k : k + DIM] - v.reshape(m, DIM)
        hi = lo
    return codes


# ---------------------------------------------------------------------------------------------
# Tensor quantizer
# ---------------------------------------------------------------------------------------------


def _blocks_mse(xb: np.ndarray, alpha: float) -> float:
    _, v = nearest(xb * alpha)
    return float(((xb - v / alpha) ** 2).sum())


def search_alpha(x: np.ndarray, coarse: int = 9, fine: int = 7) -> float:
    """Multiplier alpha minimising ||x - Q(alpha x)/alpha||^2 on a sample of 8-blocks of ``x``."""
    xb = x.reshape(-1, DIM)
    if len(xb) > ALPHA_SAMPLE_BLOCKS:
        xb = xb[np.linspace(0, len(xb) - 1, ALPHA_SAMPLE_BLOCKS).astype(np.int64)]
    rms = float(np.sqrt(np.mean(xb**2)))
    if rms == 0.0:
        return GAUSS_OPT_ALPHA
    grid = np.geomspace(0.5, 2.0, coarse) / rms
    errs = [_blocks_mse(xb, a) for a in grid]
    i = int(np.argmin(errs))
    best_a, best_e = float(grid[i]), errs[i]
    for a in np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, coarse - 1)], fine):
        e = _blocks_mse(xb, float(a))
        if e < best_e:
            best_a, best_e = float(a), e
    return best_a


def _alpha_sample(x: np.ndarray, n: int) -> np.ndarray:
    """8-blocks of the real (unpadded) entries; padding zeros would bias alpha upwards."""
    flat = x[:, :n].reshape(-1)
    k = len(flat) - len(flat) % DIM
    return flat[:k].reshape(-1, DIM) if k else x.reshape(-1, DIM)


def _validate(name: str, w: np.ndarray, hessian: np.ndarray | None, scale_mode: str) -> None:
    if w.ndim != 2 or 0 in w.shape:
        raise PgolfError(f"e8p needs a non-empty 2-D weight; {name} has shape {tuple(w.shape)}")
    if not np.all(np.isfinite(w)):
        raise PgolfError(f"{name} contains NaN or Inf; refusing to quantize")
    if scale_mode not in SCALE_MODES:
        raise PgolfError(f"unknown e8p scale mode {scale_mode!r}; choose one of {', '.join(SCALE_MODES)}")
    if hessian is not None:
        n = w.shape[1]
        if hessian.shape != (n, n):
            raise PgolfError(f"Hessian for {name} is {tuple(hessian.shape)}, expected ({n}, {n})")
        if not np.all(np.isfinite(hessian)):
            raise PgolfError(f"Hessian for {name} contains NaN or Inf")


def _refit_scale(w: np.ndarray, z: np.ndarray, h: np.ndarray | None, mode: str, fallback: np.ndarray) -> np.ndarray:
    """Least-squares scale(s) s minimising ||w - s z||_H per row (or jointly), as fp16."""
    zh = z if h is None else z @ h
    num = (w * zh).sum(axis=1)
    den = (z * zh).sum(axis=1)
    if mode == "tensor":
        num, den = np.array([num.sum()]), np.array([den.sum()])
    ok = (den > 0) & np.isfinite(num)
    s = np.where(ok, num / np.where(ok, den, 1.0), fallback)
    return np.clip(s, -FP16_MAX, FP16_MAX).astype(np.float16)


def _rotated_codes_to_weights(codes: np.ndarray, n: int, rot: RHT | None) -> np.ndarray:
    m = codes.shape[0]
    c = _codebook_f32()[codes.reshape(-1)].reshape(m, -1)[:, :n].astype(np.float64)
    return rot.inverse(c) if rot is not None else c


def quantize_e8p(
    name: str,
    w: np.ndarray,
    dtype: str,
    hessian: np.ndarray | None = None,
    rht: bool = True,
    seed: int = 0,
    ldlq: bool = True,
    scale_mode: str = "row",
    alpha: float | None = None,
    damp: float = 0.01,
) -> QuantizedTensor:
    """Quantize a 2-D weight to E8P codes (2 bits/weight) plus fp16 scales.

    ``hessian`` (in x in, e.g. sum x^T x) enables BlockLDLQ when ``ldlq`` and weights the scale
    refit; ``alpha`` fixes the multiplier on the unit-RMS rotated weights (default: searched).
    """
    w = np.asarray(w)
    _validate(name, w, hessian, scale_mode)
    w64 = w.astype(np.float64)
    m, n = w64.shape
    pad = (-n) % DIM
    if scale_mode == "row":
        base = np.sqrt((w64**2).mean(axis=1))
    else:
        base = np.full(m, np.sqrt((w64**2).mean()))
    base = np.where(base > 0, base, 1.0)
    rot = RHT.make(m, n, seed) if rht else None
    x = w64 / base[:, None]
    if rot is not None:
        x = rot.forward(x)
    if pad:
        x = np.pad(x, ((0, 0), (0, pad)))
    a = float(alpha) if alpha is not None else search_alpha(_alpha_sample(x, n))
    if not a > 0:
        raise PgolfError(f"e8p scale multiplier must be positive, got {a}")
    x *= a
    h = regularize_hessian(hessian, damp) if hessian is not None else None
    use_ldlq = bool(ldlq and h is not None)
    if use_ldlq:
        hr = rot.rotate_hessian(h) if rot is not None else h
        if pad:
            k = hr.shape[0]
            padded = np.eye(k + pad, dtype=hr.dtype)
            padded[:k, :k] = hr
            hr = padded
        codes = ldlq_round(x, hr)
    else:
        codes = nearest(x.reshape(-1, DIM))[0].reshape(m, -1)
    z = _rotated_codes_to_weights(codes, n, rot)
    fallback = base / a if scale_mode == "row" else np.array([base[0] / a])
    scale = _refit_scale(w64, z, h, scale_mode, fallback)
    params = {
        "codebook": CODEBOOK_NAME,
        "codebook_version": CODEBOOK_VERSION,
        "rht": rot is not None,
        **(rot.to_params() if rot is not None else {"seed": int(seed)}),
        "pad_cols": pad,
        "scale_mode": scale_mode,
        "alpha": a,
        "ldlq": use_ldlq,
    }
    return QuantizedTensor(
        name=name,
        shape=(m, n),
        dtype=dtype,
        scheme="e8p",
        params=params,
        streams={
            "codes": Stream(codes.astype("<u2"), "symbols", 0, NUM_CODES - 1),
            "scale": Stream(scale, "side"),
        },
    )


@register_scheme("e8p")
def dequantize_e8p(qt: QuantizedTensor) -> np.ndarray:
    """Codebook lookup, inverse RHT, times the fp16 row (or tensor) scale."""
    p = qt.params
    if p.get("codebook") != CODEBOOK_NAME or int(p.get("codebook_version", -1)) != CODEBOOK_VERSION:
        raise ArtifactError(f"tensor {qt.name}: unsupported e8p codebook {p.get('codebook')!r} v{p.get('codebook_version')}")
    if len(qt.shape) != 2:
        raise ArtifactError(f"tensor {qt.name}: e8p needs a 2-D shape, got {qt.shape}")
    m, n = qt.shape
    width = (n + int(p["pad_cols"])) // DIM
    codes = qt.streams["codes"].data
    scale = qt.streams["scale"].data.astype(np.float64).reshape(-1)
    if codes.size != m * width or (n + int(p["pad_cols"])) % DIM:
        raise ArtifactError(f"tensor {qt.name}: e8p code stream has {codes.size} codes, expected {m * width}")
    if scale.size not in (1, m):
        raise ArtifactError(f"tensor {qt.name}: e8p scale stream has {scale.size} values, expected 1 or {m}")
    rot = RHT.from_params(m, n, p) if p["rht"] else None
    z = _rotated_codes_to_weights(codes.reshape(m, width), n, rot)
    return (z * scale[:, None]).astype(np.float32)


@register_check("e8p")
def check_e8p(c: Check) -> None:
    """Codebook and version known, codes and scales exactly (m × (n+pad)/8) and (m or 1), and a
    rotation plan that is the one the encoder builds: an arbitrary plan in the manifest could ask
    for a Hadamard factor of any order (a 12,008² matrix is 1 GiB)."""
    m, n = c.matrix()
    p = c.spec.params
    if p.get("codebook") != CODEBOOK_NAME or type(p.get("codebook_version")) is not int \
            or p["codebook_version"] != CODEBOOK_VERSION:
        c.fail(f"unsupported e8p codebook {p.get('codebook')!r:.40} v{p.get('codebook_version')!r:.20}")
    pad = c.int_param("pad_cols", 0, DIM - 1)
    if (n + pad) % DIM:
        c.fail(f"pad_cols {pad} does not make {n} columns a multiple of {DIM}")
    c.int_param("seed", 0, 2**64 - 1)
    if c.bool_param("rht"):
        for key, size in (("row_blocks", m), ("col_blocks", n)):
            plan = [list(b) for b in hadamard_blocks(size)]
            if p.get(key) != plan:
                c.fail(f"params.{key} is not the rotation plan of size {size} ({plan})")
    elif "row_blocks" in p or "col_blocks" in p:
        c.fail("rotation blocks given without rht")
    mode = c.choice_param("scale_mode", SCALE_MODES)
    c.stream("codes", (m, (n + pad) // DIM), ("<u2",), "symbols", (0, NUM_CODES - 1))
    c.stream("scale", (m if mode == "row" else 1,), ("<f2",), "side", (0, 0))


# ---------------------------------------------------------------------------------------------
# Fallback selection
# ---------------------------------------------------------------------------------------------


def relative_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray | None = None) -> float:
    """||W - W^||^2 / ||W||^2, or tr(dW H dW^T) / tr(W H W^T) with a Hessian."""
    w = np.asarray(w, dtype=np.float64)
    d = w - np.asarray(w_hat, dtype=np.float64)
    if hessian is None:
        num, den = float((d**2).sum()), float((w**2).sum())
    else:
        h = np.asarray(hessian, dtype=np.float64)
        num, den = float(((d @ h) * d).sum()), float(((w @ h) * w).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def vq_error(w: np.ndarray, qt: QuantizedTensor, hessian: np.ndarray | None = None, damp: float = 0.01) -> float:
    """Relative error of quantized ``qt`` against ``w``; Hessian-weighted (regularised as for
    LDLQ) when a Hessian is given, so tensors of different layers compare on the proxy loss."""
    hr = regularize_hessian(hessian, damp) if hessian is not None else None
    return relative_error(w, dequantize_float32(qt).reshape(np.shape(w)), hr)


@dataclass
class VQErrorReport:
    name: str
    rel_err: float
    fallback: bool  # True: among the `budget` worst, send to int-k instead
    qt: QuantizedTensor


def rank_e8p_fallbacks(
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    budget: int,
    hessians: Mapping[str, np.ndarray] | None = None,
    **quant_kwargs,
) -> list[VQErrorReport]:
    """E8P-quantize every tensor and mark the ``budget`` worst by relative error (worst first).

    With a Hessian for a tensor its error is Hessian-weighted (regularised as for LDLQ), so
    tensors from different layers compare on the proxy loss; the caller re-quantizes the marked
    ones with int-k and keeps ``qt`` for the rest.
    """
    if budget < 0:
        raise PgolfError(f"fallback budget must be >= 0, got {budget}")
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    hessians = hessians or {}
    reports = []
    for name, w in items:
        h = hessians.get(name)
        qt = quantize_e8p(name, w, str(np.asarray(w).dtype), hessian=h, **quant_kwargs)
        reports.append(VQErrorReport(name, vq_error(w, qt, h, quant_kwargs.get("damp", 0.01)), False, qt))
    reports.sort(key=lambda r: -r.rel_err)
    for r in reports[:budget]:
        r.fallback = True
    return reports
