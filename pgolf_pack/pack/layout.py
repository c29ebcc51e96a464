"""Byte layouts: how one group of 2-D integer symbol arrays becomes the byte string a codec sees.

Encoded bytes, in order:

1. with ``rowsort``, one permutation per array with more than one row: the L1 chain order of its
   rows, bit-packed at ``ceil(log2(rows))`` bits per index (1,280 bytes for 1,024 rows);
2. the symbols of every array, concatenated in group order, each array walked row-major
   (``order="row"``) or column-major (``order="col"``) after its rows are permuted:
   * ``bitpack=k``: ``symbol - lo`` packed densely at k bits over the whole group;
   * otherwise: each array in its own dtype, little-endian; with ``shuffle``, each run of
     consecutive arrays of one item size is byte-shuffled as one buffer.

Nothing else is stored: shapes, dtypes and ``lo`` come from the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ArtifactError, PgolfError
from ..kernels.bitpack import pack_bits, packed_size, unpack_bits
from ..kernels.rowsort import l1_chain_order
from ..kernels.shuffle import byte_shuffle, byte_unshuffle

ORDERS = ("row", "col")
# Symbol bit-packing stays at most 16 bits (format 1); row permutations may use more.
BITPACK_MAX = 16


@dataclass(frozen=True)
class Layout:
    """How a group's symbols are laid out in bytes; see the module docstring."""

    order: str = "row"
    rowsort: bool = False
    shuffle: bool = False
    bitpack: int | None = None

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise PgolfError(f"layout order must be 'row' or 'col', got {self.order!r}")
        if self.bitpack is not None:
            if isinstance(self.bitpack, bool) or not isinstance(self.bitpack, int) or not 1 <= self.bitpack <= BITPACK_MAX:
                raise PgolfError(f"layout bitpack must be an integer in 1..{BITPACK_MAX} or None, got {self.bitpack!r}")
            if self.shuffle:
                raise PgolfError("layout cannot both bit-pack and byte-shuffle; pick one")

    @property
    def name(self) -> str:
        """Short label for tables, e.g. ``col+rowsort+bp6``."""
        parts = [self.order]
        if self.rowsort:
            parts.append("rowsort")
        if self.shuffle:
            parts.append("shuffle")
        if self.bitpack is not None:
            parts.append(f"bp{self.bitpack}")
        return "+".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        """Rebuild from :meth:`to_dict` output (an artifact manifest); malformed → ArtifactError."""
        if not isinstance(d, dict) or set(d) - {"order", "rowsort", "shuffle", "bitpack"}:
            raise ArtifactError(f"malformed layout in manifest: {d!r}")
        try:
            return cls(
                order=d.get("order", "row"),
                rowsort=_as_bool(d.get("rowsort", False)),
                shuffle=_as_bool(d.get("shuffle", False)),
                bitpack=d.get("bitpack"),
            )
        except (PgolfError, TypeError) as e:
            raise ArtifactError(f"malformed layout in manifest: {e}") from None


def _as_bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true/false, got {v!r}")
    return v


def bits_for_range(lo: int, hi: int) -> int:
    """Bits needed for ``symbol - lo`` with symbols in ``[lo, hi]`` (at least 1)."""
    return max(1, int(hi - lo).bit_length())


def perm_bits(rows: int) -> int:
    return max(1, (rows - 1).bit_length())


def perm_section_size(shapes: list[tuple], layout: Layout) -> int:
    """Bytes the row permutations take in the encoded group (0 without rowsort)."""
    if not layout.rowsort:
        return 0
    return sum(packed_size(s[0], perm_bits(s[0])) for s in shapes if s[0] > 1)


def encoded_size(shapes: list[tuple], dtypes: list[str], layout: Layout) -> int:
    """Bytes :func:`layout_encode` writes for arrays of these 2-D shapes and dtypes."""
    counts = [int(s[0]) * int(s[1]) for s in shapes]
    if layout.bitpack is not None:
        body = packed_size(sum(counts), layout.bitpack)
    else:
        body = sum(n * np.dtype(d).itemsize for n, d in zip(counts, dtypes))
    return perm_section_size(shapes, layout) + body


def _check_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"layout needs 2-D arrays; array {i} has shape {a.shape}")
        if a.dtype.kind not in "iu":
            raise TypeError(f"layout needs integer symbols; array {i} is {a.dtype}")
        out.append(a)
    return out


def _walk(a: np.ndarray, order: str) -> np.ndarray:
    return (a.T if order == "col" else a).reshape(-1)


def _itemsize_runs(itemsizes: list[int]) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive arrays sharing an item size."""
    runs, start = [], 0
    for i in range(1, len(itemsizes) + 1):
        if i == len(itemsizes) or itemsizes[i] != itemsizes[start]:
            runs.append((start, i))
            start = i
    return runs


def row_orders(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The L1 chain order of each array's rows, to reuse across several rowsort layouts."""
    return [l1_chain_order(a) for a in _check_arrays(arrays)]


def _checked_order(order: np.ndarray, rows: int) -> np.ndarray:
    perm = np.asarray(order, dtype=np.int64).reshape(-1)
    if perm.size != rows or perm.min() < 0 or perm.max() >= rows or np.bincount(perm, minlength=rows).max() != 1:
        raise ValueError(f"row order is not a permutation of {rows} rows")
    return perm


def layout_encode(
    arrays: list[np.ndarray], lo: int, layout: Layout, orders: list[np.ndarray] | None = None
) -> bytes:
    """Lay out one group of 2-D integer arrays as bytes (exact inverse: :func:`layout_decode`).

    ``orders`` (from :func:`row_orders`) skips recomputing the row sort when trying layouts.
    """
    arrays = _check_arrays(arrays)
    if orders is not None and len(orders) != len(arrays):
        raise ValueError(f"{len(orders)} row orders for {len(arrays)} arrays")
    perms: list[bytes] = []
    flats: list[np.ndarray] = []
    for i, a in enumerate(arrays):
        if layout.rowsort and a.shape[0] > 1:
            perm = l1_chain_order(a) if orders is None else _checked_order(orders[i], a.shape[0])
            perms.append(pack_bits(perm, perm_bits(a.shape[0])).tobytes())
            a = a[perm]
        flats.append(_walk(a, layout.order))
    if layout.bitpack is not None:
        data = _encode_bitpacked(flats, lo, layout.bitpack)
    else:
        data = _encode_bytes(flats, layout.shuffle)
    return b"".join(perms) + data


def _encode_bitpacked(flats: list[np.ndarray], lo: int, bits: int) -> bytes:
    sym = np.concatenate([f.astype(np.int64, copy=False) for f in flats]) if flats else np.zeros(0, np.int64)
    sym = sym - lo
    if sym.size and (sym.min() < 0 or sym.max() >= (1 << bits)):
        raise ValueError(
            f"symbols span [{int(sym.min()) + lo}, {int(sym.max()) + lo}], which does not fit "
            f"{bits} bits above lo={lo}"
        )
    return pack_bits(sym.astype(np.uint16), bits).tobytes()


def _encode_bytes(flats: list[np.ndarray], shuffle: bool) -> bytes:
    parts = []
    for start, stop in _itemsize_runs([f.dtype.itemsize for f in flats]):
        run = [f.astype(f.dtype.newbyteorder("<"), copy=False) for f in flats[start:stop]]
        buf = np.concatenate([r.view(np.uint8) for r in run])
        item = flats[start].dtype.itemsize
        parts.append((byte_shuffle(buf, item) if shuffle and item > 1 else buf).tobytes())
    return b"".join(parts)


def layout_decode(
    buf: bytes, layout: Layout, shapes: list[tuple], dtypes: list[str], lo: int
) -> list[np.ndarray]:
    """Inverse of :func:`layout_encode`: the arrays back, byte-exact, in their dtypes."""
    if len(shapes) != len(dtypes):
        raise ValueError(f"{len(shapes)} shapes but {len(dtypes)} dtypes")
    shapes = [tuple(int(x) for x in s) for s in shapes]
    if any(len(s) != 2 for s in shapes):
        raise ValueError(f"layout needs 2-D shapes, got {shapes}")
    dts = [np.dtype(d) for d in dtypes]
    if any(d.kind not in "iu" for d in dts):
        raise ValueError(f"layout needs integer dtypes, got {dtypes}")
    raw = np.frombuffer(buf, dtype=np.uint8)
    counts = [r * c for r, c in shapes]
    expected = encoded_size(shapes, dtypes, layout)
    if raw.size != expected:
        raise ArtifactError(f"layout {layout.name}: expected {expected} bytes, got {raw.size}")

    pos = 0
    perms: list[np.ndarray | None] = []
    for rows, _ in shapes:
        if layout.rowsort and rows > 1:
            bits = perm_bits(rows)
            n = packed_size(rows, bits)
            perm = unpack_bits(raw[pos : pos + n], bits, rows).astype(np.int64)
            if perm.max() >= rows or np.bincount(perm, minlength=rows).max() != 1:
                raise ArtifactError(f"layout {layout.name}: stored row permutation is not a permutation")
            perms.append(perm)
            pos += n
        else:
            perms.append(None)

    if layout.bitpack is not None:
        flats = _decode_bitpacked(raw[pos:], counts, dts, lo, layout.bitpack)
    else:
        flats = _decode_bytes(raw[pos:], counts, dts, layout.shuffle)

    out = []
    for flat, (rows, cols), perm in zip(flats, shapes, perms):
        a = flat.reshape(cols, rows).T if layout.order == "col" else flat.reshape(rows, cols)
        if perm is not None:
            unsorted = np.empty((rows, cols), dtype=a.dtype)
            unsorted[perm] = a
            a = unsorted
        out.append(np.ascontiguousarray(a))
    return out


def _split(flat: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(counts)[:-1]) if counts else []


def _decode_bitpacked(raw: np.ndarray, counts: list[int], dts: list[np.dtype], lo: int, bits: int) -> list[np.ndarray]:
    vals = unpack_bits(raw, bits, sum(counts)).astype(np.int64) + lo
    out = []
    for part, dt in zip(_split(vals, counts), dts):
        info = np.iinfo(dt)
        if part.size and (part.min() < info.min or part.max() > info.max):
            raise ArtifactError(f"bit-packed symbols do not fit {dt} (lo={lo}, {bits} bits)")
        out.append(part.astype(dt))
    return out


def _decode_bytes(raw: np.ndarray, counts: list[int], dts: list[np.dtype], shuffle: bool) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    pos = 0
    for start, stop in _itemsize_runs([d.itemsize for d in dts]):
        item = dts[start].itemsize
        n = sum(counts[start:stop]) * item
        buf = raw[pos : pos + n]
        pos += n
        if shuffle and item > 1:
            buf = byte_unshuffle(buf, item)
        off = 0
        for cnt, dt in zip(counts[start:stop], dts[start:stop]):
            nb = cnt * item
            out.append(buf[off : off + nb].copy().view(dt.newbyteorder("<")).astype(dt))
            off += nb
    return out


# The L1 row chain compares every row with every unused row: quadratic in rows (about 30 s for
# 70,000 rows on a busy core). Above this many rows in one array it is not offered.
ROWSORT_MAX_ROWS = 16384


def candidate_layouts(dtype: str | np.dtype, lo: int, hi: int, max_rows: int = 0) -> list[Layout]:
    """Layouts worth measuring for a group, most promising first.

    Column-major walks, then L1 row sort on top, helped lrzip by 2-7% on int6 symbols (the
    structure is per input feature); bit-packing usually hurts LZ/context-mixing codecs but can
    win for ``raw``/``lzma``, so it is offered whenever the range is narrower than the dtype.
    ``max_rows``: the most rows of any array in the group (row sort is skipped for huge ones).
    """
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        raise ValueError(f"layout needs an integer dtype, got {dt}")
    if hi < lo:
        raise ValueError(f"empty symbol range [{lo}, {hi}]")
    bits = bits_for_range(lo, hi)
    walks = [Layout("col", rowsort=True), Layout("col"), Layout("row")]
    if max_rows > ROWSORT_MAX_ROWS:
        walks = walks[1:]
    out = list(walks)
    if dt.itemsize > 1:
        out += [Layout(w.order, rowsort=w.rowsort, shuffle=True) for w in walks]
    if bits < 8 * dt.itemsize and bits <= BITPACK_MAX:
        out += [Layout(w.order, rowsort=w.rowsort, bitpack=bits) for w in walks]
        # A byte per symbol (offset by lo) keeps byte alignment for codecs that want it.
        if bits < 8 < 8 * dt.itemsize:
            out += [Layout(w.order, rowsort=w.rowsort, bitpack=8) for w in walks]
    return out
