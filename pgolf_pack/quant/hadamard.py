"""Randomized Hadamard transform (RHT), the incoherence step of QuIP#.

A weight ``W`` (m x n) is rotated on both sides, ``W' = M_m S_m W S_n M_n^T``, where ``S`` are
diagonal random ±1 sign matrices and ``M`` orthonormal Hadamard transforms. The rotation spreads
outliers over whole rows/columns so that ``W'`` looks i.i.d. Gaussian, which is what a lattice
codebook quantizes well. The inverse is ``W = S_m M_m^T W' M_n S_n``.

Sizes. ``M_n`` is ``(H_K kron H_P) / sqrt(n)`` with ``H_P`` the Sylvester (natural order)
Walsh-Hadamard matrix of a power of two ``P`` (applied as a fast butterfly) and ``H_K`` a small
Hadamard matrix from a Paley construction (K = 12, 20, 24, 28, 36, ...), so 384 = 12·32,
640 = 20·32, 768 = 12·64 and 1536 = 12·128 are exact. For K = 12, 20 we use Paley I as
``(I + S)^T``, which equals QuIP#'s tables. We chose the Kronecker product over padding because
padding changes the stored shape (more codes to pay for) and pad-then-truncate is not invertible.
A size with no such factorisation (n ≡ 2 mod 4, odd n, or an odd part without a Paley matrix) is
split greedily into consecutive blocks of the largest supported sizes and rotated block-diagonally:
still exactly orthogonal, but an outlier only spreads within its block.

Signs come from numpy's PCG64 raw 64-bit output seeded through ``SeedSequence([seed, side])``;
both are specified algorithms, so the signs are the same on every platform and numpy version.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import PgolfError

# Largest small Hadamard factor we build; larger K would make the dense H_K product costly.
MAX_K = 256
SIDE_COLS = 0
SIDE_ROWS = 1

Block = tuple[int, int]  # (K, P): a block of size K*P transformed by (H_K kron H_P)/sqrt(K*P)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    f = 2
    while f * f <= q:
        if q % f == 0:
            return False
        f += 1
    return True


def _legendre_row(q: int) -> np.ndarray:
    """chi(k) for k in 0..q-1: 0, +1 for quadratic residues, -1 otherwise."""
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    chi[[(k * k) % q for k in range(1, q)]] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    idx = np.arange(q)
    return _legendre_row(q)[(idx[None, :] - idx[:, None]) % q]


def _paley1(k: int) -> np.ndarray:
    """Paley I, q = k-1 prime ≡ 3 (mod 4): (I + S)^T with S the skew conference matrix."""
    q = k - 1
    s = np.zeros((k, k), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return (np.eye(k, dtype=np.int64) + s).T


def _paley2(k: int) -> np.ndarray:
    """Paley II, q = k/2-1 prime ≡ 1 (mod 4): symmetric conference matrix C, then C⊗A + I⊗B."""
    q = k // 2 - 1
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, 1], [1, -1]], dtype=np.int64)
    b = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)


def _paley_kind(k: int) -> str | None:
    if k % 4 or k < 4:
        return None
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return "paley1"
    if _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@lru_cache(maxsize=None)
def small_hadamard(k: int) -> np.ndarray:
    """Unnormalised K x K ±1 Hadamard matrix for K = 1 or a Paley order (int64, read-only)."""
    if k == 1:
        h = np.ones((1, 1), dtype=np.int64)
    else:
        kind = _paley_kind(k)
        if kind is None:
            raise ValueError(f"no Paley Hadamard matrix of order {k}")
        h = _paley1(k) if kind == "paley1" else _paley2(k)
    h.setflags(write=False)
    return h


def _small_orders() -> list[int]:
    return [1] + [k for k in range(4, MAX_K + 1, 4) if not _is_pow2(k) and _paley_kind(k) is not None]


SMALL_ORDERS: tuple[int, ...] = tuple(_small_orders())


def kron_factor(n: int) -> Block | None:
    """(K, P) with n = K*P, P a power of two and K the smallest supported order; None if none."""
    for k in SMALL_ORDERS:
        if n % k == 0 and _is_pow2(n // k):
            return (k, n // k)
    return None


def hadamard_blocks(n: int) -> list[Block]:
    """The block plan for an n-point transform: one full-width block whenever n factors."""
    if n < 1:
        raise ValueError("transform size must be positive")
    blocks: list[Block] = []
    rem = n
    while rem:
        # The largest size <= rem that factors: for each K the largest K * 2^p <= rem. Stepping
        # down one size at a time instead costs O(n) per block, minutes for a manifest's huge n.
        size = max(k << ((rem // k).bit_length() - 1) for k in SMALL_ORDERS if k <= rem)
        blocks.append(kron_factor(size))  # type: ignore[arg-type]
        rem -= size
    return blocks


@lru_cache(maxsize=None)
def _sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < p:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised Sylvester Walsh-Hadamard transform along the last axis (length a power of two).

    Uses H_P = H_P1 kron H_P2 with P1, P2 ~ sqrt(P): two small matrix products run at BLAS speed,
    about 10x faster in numpy than a log2(P)-pass butterfly.
    """
    p = x.shape[-1]
    if not _is_pow2(p):
        raise ValueError(f"fwht needs a power-of-two length, got {p}")
    dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    p1 = 1 << ((p.bit_length() - 1) // 2)
    y = x.reshape(-1, p1, p // p1).astype(dt, copy=False) @ _sylvester(p // p1).astype(dt)
    return np.matmul(_sylvester(p1).astype(dt), y).reshape(x.shape)


def _apply_block(x: np.ndarray, k: int, p: int, transpose: bool) -> np.ndarray:
    """(H_K kron H_P) x / sqrt(K P) on the last axis; transpose uses H_K^T (H_P is symmetric)."""
    lead = x.shape[:-1]
    y = fwht(x.reshape(*lead, k, p))
    if k > 1:
        hk = small_hadamard(k).astype(x.dtype)
        y = np.matmul(hk.T if transpose else hk, y)
    return (y / np.sqrt(k * p).astype(x.dtype)).reshape(x.shape)


def hadamard_transform(
    x: np.ndarray, axis: int = -1, blocks: list[Block] | None = None, transpose: bool = False
) -> np.ndarray:
    """Apply M_n (or M_n^T) to every vector along ``axis``; float32 stays float32."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    n = x.shape[axis]
    blocks = hadamard_blocks(n) if blocks is None else [tuple(b) for b in blocks]  # type: ignore[misc]
    if sum(k * p for k, p in blocks) != n:
        raise ValueError(f"block plan {blocks} does not cover size {n}")
    y = np.moveaxis(x, axis, -1)
    out = np.empty_like(y)
    start = 0
    for k, p in blocks:
        stop = start + k * p
        out[..., start:stop] = _apply_block(y[..., start:stop], k, p, transpose)
        start = stop
    return np.moveaxis(out, -1, axis)


def hadamard_matrix(n: int, dtype=np.float64) -> np.ndarray:
    """Dense orthonormal M_n (for tests and small problems)."""
    return hadamard_transform(np.eye(n, dtype=dtype), axis=0)


def random_signs(n: int, seed: int, side: int = SIDE_COLS) -> np.ndarray:
    """n reproducible ±1 values (float64) from PCG64 raw bits; ``side`` separates row/column signs."""
    if seed < 0 or side < 0:
        raise PgolfError(f"RHT seed must be a non-negative integer, got {seed}")
    words = np.random.PCG64(np.random.SeedSequence([int(seed), int(side)])).random_raw((n + 63) // 64)
    bits = np.unpackbits(np.asarray(words, dtype="<u8").view(np.uint8), bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


@dataclass(frozen=True)
class RHT:
    """Two-sided randomized Hadamard rotation for an (m x n) matrix; either side may be off."""

    m: int
    n: int
    seed: int
    row_blocks: tuple[Block, ...] | None  # None: rows are not rotated
    col_blocks: tuple[Block, ...] | None

    @classmethod
    def make(cls, m: int, n: int, seed: int = 0, rows: bool = True, cols: bool = True) -> "RHT":
        return cls(
            m, n, int(seed),
            tuple(hadamard_blocks(m)) if rows else None,
            tuple(hadamard_blocks(n)) if cols else None,
        )

    @property
    def row_signs(self) -> np.ndarray:
        return random_signs(self.m, self.seed, SIDE_ROWS)

    @property
    def col_signs(self) -> np.ndarray:
        return random_signs(self.n, self.seed, SIDE_COLS)

    def _check(self, w: np.ndarray) -> None:
        if w.shape[-2:] != (self.m, self.n):
            raise ValueError(f"RHT built for {(self.m, self.n)}, got {w.shape}")

    def forward(self, w: np.ndarray) -> np.ndarray:
        """W' = M_m S_m W S_n M_n^T."""
        w = np.asarray(w)
        self._check(w)
        dt = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float64
        y = w.astype(dt, copy=True)
        if self.col_blocks is not None:
            y = hadamard_transform(y * self.col_signs.astype(dt), -1, list(self.col_blocks))
        if self.row_blocks is not None:
            y = hadamard_transform(y * self.row_signs.astype(dt)[:, None], -2, list(self.row_blocks))
        return y

    def inverse(self, w: np.ndarray) -> np.ndarray:
        """W = S_m M_m^T W' M_n S_n (exact inverse of :meth:`forward`)."""
        w = np.asarray(w)
        self._check(w)
        dt = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float64
        y = w.astype(dt, copy=True)
        if self.row_blocks is not None:
            y = hadamard_transform(y, -2, list(self.row_blocks), transpose=True) * self.row_signs.astype(dt)[:, None]
        if self.col_blocks is not None:
            y = hadamard_transform(y, -1, list(self.col_blocks), transpose=True) * self.col_signs.astype(dt)
        return y

    def rotate_hessian(self, h: np.ndarray) -> np.ndarray:
        """H' = M_n S_n H S_n M_n^T, so tr(dW H dW^T) = tr(dW' H' dW'^T)."""
        h = np.asarray(h, dtype=np.float64)
        if h.shape != (self.n, self.n):
            raise ValueError(f"Hessian must be {self.n}x{self.n}, got {h.shape}")
        if self.col_blocks is None:
            return h.copy()
        s = self.col_signs
        y = hadamard_transform(h * s[:, None] * s[None, :], 0, list(self.col_blocks))
        return hadamard_transform(y, 1, list(self.col_blocks))

    def to_params(self) -> dict:
        return {
            "seed": self.seed,
            "row_blocks": None if self.row_blocks is None else [list(b) for b in self.row_blocks],
            "col_blocks": None if self.col_blocks is None else [list(b) for b in self.col_blocks],
        }

    @classmethod
    def from_params(cls, m: int, n: int, params: dict) -> "RHT":
        def blocks(v):
            return None if v is None else tuple((int(k), int(p)) for k, p in v)

        return cls(m, n, int(params["seed"]), blocks(params["row_blocks"]), blocks(params["col_blocks"]))
