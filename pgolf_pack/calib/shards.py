"""Token shards in the Parameter Golf format (``fineweb_*.bin``).

Layout: 256 little-endian int32 header words (magic 20240520, version 1, token count, then
zeros), followed by the tokens as little-endian uint16. The file size must match the count.
"""

from __future__ import annotations

import glob as globmod
import os
from pathlib import Path

import numpy as np

from ..errors import PgolfError
from ..fileio import atomic_write

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4


def _read_header(path: Path) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PgolfError(f"token shard not found: {path}") from None
    if not path.is_file():
        raise PgolfError(f"token shard is not a file: {path}")
    if size < HEADER_BYTES:
        raise PgolfError(f"token shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if int(header[0]) != SHARD_MAGIC:
        raise PgolfError(f"{path} is not a token shard (magic {int(header[0])}, expected {SHARD_MAGIC})")
    if int(header[1]) != SHARD_VERSION:
        raise PgolfError(f"token shard {path} has unsupported version {int(header[1])} (expected {SHARD_VERSION})")
    count = int(header[2])
    if count < 0:
        raise PgolfError(f"token shard {path} has a negative token count {count}")
    expected = HEADER_BYTES + 2 * count
    if size < expected:
        raise PgolfError(f"token shard {path} is truncated: header says {count} tokens ({expected} bytes), file has {size}")
    if size > expected:
        raise PgolfError(f"token shard {path} has {size - expected} trailing bytes after its {count} tokens")
    return count


def read_shard(path: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
    """Tokens of one shard as a native-order uint16 array."""
    path = Path(path)
    count = _read_header(path)
    if max_tokens is not None:
        count = min(count, max(int(max_tokens), 0))
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    if tokens.size != count:
        raise PgolfError(f"token shard {path}: short read ({tokens.size} of {count} tokens)")
    return tokens.astype(np.uint16, copy=False)


def write_shard(path: str | os.PathLike, tokens) -> Path:
    """Write ``tokens`` (any integer array-like, values 0..65535) as one shard, atomically."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise PgolfError(f"token shard needs a 1-D token array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise PgolfError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
        raise PgolfError(f"token ids must fit uint16 (0..65535), got range {int(arr.min())}..{int(arr.max())}")
    if arr.size > np.iinfo(np.int32).max:
        raise PgolfError(f"too many tokens for one shard: {arr.size}")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    body = arr.astype("<u2", copy=False)

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(body.tobytes())

    return atomic_write(path, _write)


def shard_paths(pattern: str | os.PathLike) -> list[Path]:
    """Files matching a glob pattern (or one literal path), sorted by name."""
    pattern = str(pattern)
    paths = sorted(Path(p) for p in globmod.glob(pattern) if Path(p).is_file())
    if not paths:
        raise PgolfError(f"no token shards match {pattern}")
    return paths


def load_tokens(pattern: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
    """Concatenate the shards matching ``pattern`` in sorted order, stopping after ``max_tokens``."""
    parts: list[np.ndarray] = []
    remaining = None if max_tokens is None else int(max_tokens)
    if remaining is not None and remaining < 0:
        raise PgolfError(f"max_tokens must be non-negative, got {max_tokens}")
    for path in shard_paths(pattern):
        if remaining == 0:
            break
        part = read_shard(path, max_tokens=remaining)
        parts.append(part)
        if remaining is not None:
            remaining -= part.size
    if not parts:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]
