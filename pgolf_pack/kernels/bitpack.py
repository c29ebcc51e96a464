"""Dense k-bit packing of unsigned symbols into a little-endian bit stream.

Symbol ``i`` occupies bits ``[i*k, (i+1)*k)`` of the stream, least significant bit first, and bit
``b`` of the stream is bit ``b % 8`` of byte ``b // 8``. The last byte is zero-padded, so the
stream is ``ceil(n*k/8)`` bytes and the same symbols always give the same bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Up to 32: row permutations of a vocabulary over 65,536 rows need 17+ bits per index. The
# 64-bit accumulator holds at most 7 + 32 pending bits, so wider symbols would not fit.
MAX_BITS = 32


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` symbols packed at ``bits`` bits each."""
    return (count * bits + 7) // 8


def unpacked_dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint8) if bits <= 8 else np.dtype(np.uint16) if bits <= 16 else np.dtype(np.uint32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


@njit(cache=True, nogil=True)
def _pack_kernel(values, bits, out):
    # uint64 throughout: numba promotes uint64 op int64 to float64.
    k = np.uint64(bits)
    eight = np.uint64(8)
    acc = np.uint64(0)
    nacc = np.uint64(0)
    seen = np.uint64(0)
    j = 0
    for i in range(values.size):
        v = np.uint64(values[i])
        seen |= v
        acc |= v << nacc
        nacc += k
        while nacc >= eight:
            out[j] = np.uint8(acc & np.uint64(0xFF))
            acc >>= eight
            nacc -= eight
            j += 1
    if nacc > np.uint64(0):
        out[j] = np.uint8(acc & np.uint64(0xFF))
    return seen


@njit(cache=True, nogil=True)
def _unpack_kernel(buf, bits, out):
    k = np.uint64(bits)
    eight = np.uint64(8)
    mask = (np.uint64(1) << k) - np.uint64(1)
    acc = np.uint64(0)
    nacc = np.uint64(0)
    j = 0
    for i in range(out.size):
        while nacc < k:
            acc |= np.uint64(buf[j]) << nacc
            nacc += eight
            j += 1
        out[i] = acc & mask
        acc >>= k
        nacc -= k


def _as_symbols(values: np.ndarray, bits: int) -> np.ndarray:
    """A contiguous uint8/uint16/uint32 view or copy; other dtypes are range-checked here."""
    v = np.ascontiguousarray(values).reshape(-1)
    if v.dtype in (np.uint8, np.uint16, np.uint32):
        return v
    if v.dtype.kind not in "iu":
        raise TypeError(f"bit packing needs integer symbols, got {v.dtype}")
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"symbols out of range for {bits}-bit packing: [{v.min()}, {v.max()}]")
    return v.astype(np.uint16 if bits <= 16 else np.uint32)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer symbols, each ``< 2**bits``, into a uint8 bit stream."""
    _check_bits(bits)
    v = _as_symbols(values, bits)
    out = np.empty(packed_size(v.size, bits), dtype=np.uint8)
    seen = _pack_kernel(v, bits, out)
    if int(seen) >> bits:
        raise ValueError(f"symbols out of range for {bits}-bit packing (max {int(v.max())})")
    return out


def unpack_bits(buf: np.ndarray | bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` symbols as uint8 (bits <= 8) or uint16."""
    _check_bits(bits)
    b = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else buf
    b = np.ascontiguousarray(b, dtype=np.uint8).reshape(-1)
    if b.size < packed_size(count, bits):
        raise ValueError(f"bit stream too short: {b.size} bytes for {count} symbols of {bits} bits")
    out = np.empty(count, dtype=unpacked_dtype(bits))
    _unpack_kernel(b, bits, out)
    return out


def pack_bits_ref(values: np.ndarray, bits: int) -> np.ndarray:
    """Numpy reference for :func:`pack_bits` (one byte per bit: memory-hungry, slow)."""
    _check_bits(bits)
    v = np.asarray(values).reshape(-1).astype(np.uint64)
    if v.size and int(v.max()) >> bits:
        raise ValueError(f"symbols out of range for {bits}-bit packing")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits_ref(buf: np.ndarray | bytes, bits: int, count: int) -> np.ndarray:
    """Numpy reference for :func:`unpack_bits`."""
    _check_bits(bits)
    b = np.frombuffer(bytes(buf), dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    planes = np.unpackbits(b, bitorder="little")[: count * bits].reshape(count, bits)
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    return (planes.astype(np.uint64) @ weights).astype(unpacked_dtype(bits))


_NP_CHUNK = 1 << 20


def unpack_bits_np(buf: np.ndarray | bytes, bits: int, count: int) -> np.ndarray:
    """:func:`unpack_bits` in plain numpy (same checks, same output): the exported decoder's path,
    which cannot carry numba. Each symbol is gathered from the bytes its bits touch, a chunk of
    symbols at a time, so memory stays at a few bytes per symbol."""
    _check_bits(bits)
    b = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else buf
    b = np.ascontiguousarray(b, dtype=np.uint8).reshape(-1)
    if b.size < packed_size(count, bits):
        raise ValueError(f"bit stream too short: {b.size} bytes for {count} symbols of {bits} bits")
    span = (bits + 7 + 7) // 8  # bytes one symbol can touch
    padded = np.concatenate([b[: packed_size(count, bits)], np.zeros(span, np.uint8)]).astype(np.uint64)
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    out = np.empty(count, dtype=unpacked_dtype(bits))
    for i0 in range(0, count, _NP_CHUNK):
        pos = np.arange(i0, min(count, i0 + _NP_CHUNK), dtype=np.uint64) * np.uint64(bits)
        first = (pos >> np.uint64(3)).astype(np.int64)
        acc = np.zeros(first.size, np.uint64)
        for t in range(span):
            acc |= padded[first + t] << np.uint64(8 * t)
        out[i0 : i0 + first.size] = (acc >> (pos & np.uint64(7))) & mask
    return out
