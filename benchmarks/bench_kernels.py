"""Numba kernels against their numpy references on realistic sizes (after JIT warm-up).

Sizes follow a 17M-parameter Parameter Golf model: 17M int6 symbols for bit packing, byte
shuffle (as int16); 1024x512 int8 matrices (embedding, MLP fc) for the row chain.

Run: python benchmarks/bench_kernels.py [--symbols 17000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from pgolf_pack.kernels.bitpack import pack_bits, pack_bits_ref, unpack_bits, unpack_bits_ref
from pgolf_pack.kernels.rowsort import l1_chain_order, l1_chain_order_ref
from pgolf_pack.kernels.shuffle import byte_shuffle, byte_shuffle_ref, byte_unshuffle, byte_unshuffle_ref


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out, best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def int6_symbols(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian weights at a fine int6 step, the hard case for codecs (~5 bits/symbol)."""
    return np.clip(np.rint(rng.normal(0.0, 8.0, n)), -31, 31).astype(np.int8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=17_000_000)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    sym = int6_symbols(args.symbols, rng)
    offset = (sym.astype(np.int16) + 31).astype(np.uint8)  # symbol - lo, in [0, 62]
    packed = pack_bits(offset, 6)
    wide = sym.astype("<i2").view(np.uint8)
    planes = byte_shuffle(wide, 2)
    # Per-column spread, as real weight matrices have (see research/bench-findings.md).
    col_scale = rng.uniform(0.5, 2.0, args.cols)
    mat = np.clip(np.rint(rng.normal(0.0, 6.0, (args.rows, args.cols)) * col_scale), -31, 31).astype(np.int8)

    n = args.symbols
    cases = [
        ("bitpack pack k=6", f"{n:,} int6", lambda: pack_bits(offset, 6), lambda: pack_bits_ref(offset, 6)),
        ("bitpack unpack k=6", f"{n:,} int6", lambda: unpack_bits(packed, 6, n), lambda: unpack_bits_ref(packed, 6, n)),
        ("byte shuffle", f"{n:,} int16", lambda: byte_shuffle(wide, 2), lambda: byte_shuffle_ref(wide, 2)),
        ("byte unshuffle", f"{n:,} int16", lambda: byte_unshuffle(planes, 2), lambda: byte_unshuffle_ref(planes, 2)),
        ("L1 row chain", f"{args.rows}x{args.cols} int8", lambda: l1_chain_order(mat), lambda: l1_chain_order_ref(mat)),
    ]

    print(f"{'kernel':<20} {'input':<18} {'numba ms':>10} {'numpy ms':>10} {'speedup':>8}")
    for name, size, fast, ref in cases:
        fast()  # JIT compile (or load from cache) outside the timing
        t_fast, out_fast = best_time(fast, args.repeats)
        t_ref, out_ref = best_time(ref, args.repeats)
        if not np.array_equal(np.asarray(out_fast), np.asarray(out_ref)):
            raise SystemExit(f"{name}: numba and numpy results differ")
        print(f"{name:<20} {size:<18} {t_fast * 1e3:>10.1f} {t_ref * 1e3:>10.1f} {t_ref / t_fast:>7.1f}x")


if __name__ == "__main__":
    main()
