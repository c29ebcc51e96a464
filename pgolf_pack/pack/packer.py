"""Group quantized streams, pick a layout and codec per group, and write/read the artifact.

Symbol streams are grouped by role (the tensor name with its layer index removed, e.g. every
layer's ``mlp.fc.weight`` symbols form one group) because tensors of one role share statistics,
which is what both context-mixing and model-based coders exploit. Side streams (scales, float
passthrough, factors) go to small side groups split by item size so byte-shuffle can help them.
"""

from __future__ import annotations

import math
import re
import threading
import zlib
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from ..errors import ArtifactError, PgolfError
from ..quant.base import QuantizedModel, QuantizedTensor, Stream
from . import codecs
from .codecs import BYTE_DECODERS, SYMBOL_DECODERS
from .container import FORMAT_VERSION, crc32, group_payload, header_bytes, read_container, write_container
from .layout import Layout, candidate_layouts, encoded_size, layout_decode, layout_encode, perm_section_size, row_orders

AUTO_MODES = ("auto", "auto-fast")
CODEC_CHOICES = AUTO_MODES + tuple(codecs.CODECS)
_LAYER_RE = re.compile(r"(^|\.)(blocks|layers|h|layer)\.\d+\.")


@dataclass
class Group:
    name: str
    kind: str  # "symbols" | "side"
    members: list[tuple[str, str]] = field(default_factory=list)  # (tensor, stream)
    arrays: list[np.ndarray] = field(default_factory=list)
    lo: int = 0
    hi: int = 0
    _orders: list[np.ndarray] | None = None

    def orders(self) -> list[np.ndarray]:
        """The L1 row-chain orders, computed once however many layouts and codecs try them."""
        if self._orders is None:
            self._orders = row_orders([_as_2d(a) for a in self.arrays])
        return self._orders

    @property
    def raw_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def role_of(name: str) -> str:
    return _LAYER_RE.sub(r"\1", name)


def _as_2d(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return a
    if a.ndim <= 1:
        return a.reshape(1, -1)
    return a.reshape(a.shape[0], -1)


def group_name(tensor: str, params: dict, stream: str, kind: str, dtype: np.dtype, grouping: str) -> str:
    """The group a stream is packed in; the manifest check asks the same function where it must be."""
    if kind == "side":
        return f"side:{dtype.itemsize}"
    base = params.get("group") or {"role": role_of(tensor), "tensor": tensor, "single": "all"}[grouping]
    return f"{base}:{stream}:{dtype.str}"


def build_groups(qm: QuantizedModel, grouping: str = "role") -> list[Group]:
    if grouping not in ("role", "tensor", "single"):
        raise PgolfError(f"unknown grouping {grouping!r}; choose role, tensor or single")
    groups: dict[str, Group] = {}
    for t in qm.tensors:
        # Sorted: the manifest stores streams by name, so a decoded model re-packs identically.
        for sname, s in sorted(t.streams.items()):
            key = group_name(t.name, t.params, sname, s.kind, s.data.dtype, grouping)
            g = groups.get(key)
            if g is None:
                g = groups[key] = Group(key, s.kind, lo=s.lo, hi=s.hi)
            g.members.append((t.name, sname))
            g.arrays.append(s.data)
            g.lo, g.hi = min(g.lo, s.lo), max(g.hi, s.hi)
    # Symbols first (in first-appearance order), side groups last: a stable, deterministic order.
    ordered = [g for g in groups.values() if g.kind == "symbols"] + [g for g in groups.values() if g.kind == "side"]
    return ordered


def _raw_crc(arrays: list[np.ndarray]) -> int:
    c = 0
    for a in arrays:
        c = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), c)
    return c & 0xFFFFFFFF


# --- side groups: concatenated raw bytes, optionally byte-shuffled ---------------------------------


def _side_encode(arrays: list[np.ndarray], shuffle: bool) -> bytes:
    raw = np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.uint8)
    item = arrays[0].dtype.itemsize if arrays else 1
    if shuffle and item > 1:
        raw = raw.reshape(-1, item).T.copy().reshape(-1)
    return raw.tobytes()


def _side_decode(buf: bytes, shuffle: bool, shapes: list[tuple], dtypes: list[str]) -> list[np.ndarray]:
    raw = np.frombuffer(buf, np.uint8)
    item = np.dtype(dtypes[0]).itemsize if dtypes else 1
    if shuffle and item > 1:
        if raw.size % item:
            raise ArtifactError("side group size is not a multiple of its item size")
        raw = raw.reshape(item, -1).T.reshape(-1)
    out, pos = [], 0
    for shape, dt in zip(shapes, dtypes):
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        if pos + n > raw.size:
            raise ArtifactError("side group is shorter than its manifest says")
        out.append(raw[pos : pos + n].copy().view(dt).reshape(shape))
        pos += n
    return out


# --- encoding one group ----------------------------------------------------------------------------


def _candidates(codec: str, kind: str) -> list[codecs.Codec]:
    """The registered codecs ``codec`` (a name, ``auto`` or ``auto-fast``) tries on a group."""
    if kind == "side":
        if codec in AUTO_MODES or codecs.get(codec).takes != "bytes":
            # Side data is small float bytes: the fast byte codecs find the best cheaply.
            return [c for c in codecs.CODECS.values() if c.takes == "bytes" and c.auto_fast and c.available()]
        return [codecs.get(codec)]
    if codec == "auto":
        return [c for c in codecs.CODECS.values() if c.auto and c.available()]
    if codec == "auto-fast":
        return [c for c in codecs.CODECS.values() if c.auto_fast and c.available()]
    return [codecs.get(codec)]


def _laid_out(g: Group, lay: Layout) -> bytes:
    return layout_encode([_as_2d(a) for a in g.arrays], g.lo, lay, g.orders() if lay.rowsort else None)


def _encode_with(desc: dict, g: Group, laid: bytes | None = None) -> tuple[bytes, dict]:
    """Encode ``g`` as ``desc`` says; returns the payload and the full descriptor.

    ``laid``: the group already in ``desc``'s layout, when the caller has it.
    """
    c = codecs.get(desc["codec"])
    if c.takes == "symbols":
        if g.kind == "side":
            raise PgolfError(f"codec {c.name} codes symbol groups only, not side group {g.name}")
        payload, extras = c.encode([_as_2d(a) for a in g.arrays], g.lo, g.hi, desc)
        return payload, {**desc, **extras}
    if g.kind == "side":
        return c.encode(_side_encode(g.arrays, desc.get("shuffle", False))), desc
    return c.encode(laid if laid is not None else _laid_out(g, Layout.from_dict(desc["layout"]))), desc


def _best_layout(g: Group, sampled: bool = False) -> tuple[Layout, bytes, _Slice | None]:
    """The layout a fast zstd codes smallest, the group laid out in it, and (``sampled``, a
    group over the sampling size) the winner's :class:`_Slice`.

    ``sampled`` (auto-fast) ranks a large group's layouts on their slices instead of the whole
    (an eighth of the cost) and with zstd-3 rather than zstd-6, so the winner's ranking size is
    its slice's fast size, the screen :func:`_hopeless` starts from."""
    cands = candidate_layouts(g.arrays[0].dtype.str, g.lo, g.hi, max(_as_2d(a).shape[0] for a in g.arrays))
    if len(cands) == 1:
        return cands[0], _laid_out(g, cands[0]), None
    # A fast zstd ranks the layouts; the expensive final codecs then run once, on the winner.
    import zstandard

    proxy = zstandard.ZstdCompressor(level=6)
    best: tuple[float, Layout, bytes, _Slice | None] | None = None
    for lay in cands:
        data = _laid_out(g, lay)
        piece = None
        if sampled and len(data) >= _SAMPLE_MIN:
            piece = _Slice(data, _head(g, lay))
            size = piece.fast
        else:
            size = len(proxy.compress(data))
        if best is None or size < best[0]:  # the first on a tie, as argmin
            best = (size, lay, data, piece)
    return best[1], best[2], best[3]


def _head(g: Group, lay: Layout) -> int:
    return perm_section_size([_as_2d(a).shape for a in g.arrays], lay)


# auto-fast skips a byte codec on a large group when a slice of the group, coded with it and
# scaled up, is clearly bigger than what is already in hand: the slow settings (brotli-11, lzma-9e,
# zstd-22) cost minutes on a 17M-parameter model and rarely beat the entropy coder on quantized
# symbols. The slice's estimate errs both ways (on the 47 symbol groups of at least 256 KiB in six
# bench artifacts, RTN/GPTQ int6, the record recipe, three ECSQ rates: 0.964-1.20 of the whole
# group's size, within 3.6% on int6 codes, the large errors on ECSQ codes the entropy coder codes
# far smaller); the margin keeps codecs that are close in the race.
_SAMPLE_MIN = 1 << 20
_SAMPLE_MARGIN = 1.03
# Before running a slow codec on the slice, a fast zstd (level 3, milliseconds) codes it: no slow
# setting is expected to beat that by more than this factor. Same groups: the smallest ratio of
# a slow codec on the whole group to zstd-3's slice estimate was 0.715 (brotli on an ECSQ group),
# most were 0.75-1.0; with the margin, a codec is skipped only below 0.70 / 1.03 = 0.680.
_FAST_LEVEL = 3
_SLOW_OVER_FAST_MIN = 0.70
# Groups under the sampling size but over this one are screened by zstd-3 on the whole of them.
_SCREEN_MIN = 1 << 16
_CHUNKS = 64


class _Slice:
    """Evenly spaced chunks of a laid-out group, an eighth of it in all (a column-major layout
    changes statistics along the stream, so one contiguous slice would not be representative;
    with sixteen chunks the estimate fell to 0.865 of the whole on one row-sorted bench group),
    and the fast coder's size of it, both made at most once per group. The first ``head`` bytes, a
    row-sorted layout's permutations (packed indices, next to incompressible), are left out of
    the chunks and counted at their length."""

    def __init__(self, data: bytes, head: int = 0) -> None:
        self.head = head if len(data) >= _SAMPLE_MIN else 0
        body = data[self.head:]
        self.data = self.sample(body)
        self.scale = len(body) / max(len(self.data), 1)

    def size(self, coded: int) -> float:
        """The whole group's estimated size from ``coded``, the size of the slice coded."""
        return self.head + coded * self.scale

    @cached_property
    def fast(self) -> float:
        import zstandard

        return self.size(len(zstandard.ZstdCompressor(level=_FAST_LEVEL).compress(self.data)))

    @staticmethod
    def sample(data: bytes) -> bytes:
        """The chunks of ``data``; a group under the sampling size is its own slice."""
        if len(data) < _SAMPLE_MIN:
            return data
        n = max(_SAMPLE_MIN // 2, len(data) // 8) // _CHUNKS
        step = (len(data) - n) // (_CHUNKS - 1)
        return b"".join(data[i * step:i * step + n] for i in range(_CHUNKS))


def _hopeless(codec: str, data: bytes, best: int, piece: _Slice | None = None) -> bool:
    """Whether ``codec`` on the laid-out group ``data`` is clearly bigger than ``best`` bytes."""
    if len(data) < _SCREEN_MIN:
        return False  # where zstd-3 has too little to work on for its size to bound the others
    piece = piece or _Slice(data)
    if _SLOW_OVER_FAST_MIN * piece.fast > _SAMPLE_MARGIN * best:
        return True
    if len(data) < _SAMPLE_MIN:
        return False  # small enough to run the codec itself
    return piece.size(len(codecs.compress(codec, piece.data))) > _SAMPLE_MARGIN * best


def encode_group(g: Group, codec: str, fixed: dict | None = None) -> tuple[bytes, dict]:
    """Encode one group; returns (payload, descriptor). ``fixed`` replays a recorded choice."""
    if fixed is not None:
        return _encode_with(dict(fixed), g)
    options: list[dict] = []
    layout, laid, piece = None, b"", None
    for c in _candidates(codec, g.kind):
        if g.kind == "side":
            for sh in ([False, True] if g.arrays and g.arrays[0].dtype.itemsize > 1 else [False]):
                options.append({"codec": c.name, "shuffle": sh})
        elif c.takes == "symbols":
            options.append({"codec": c.name})
        else:
            if layout is None:
                # Every byte codec gets the same layout, laid out once.
                layout, laid, piece = _best_layout(g, sampled=codec == "auto-fast")
            options.append({"codec": c.name, "layout": layout.to_dict()})
    best: tuple[bytes, dict] | None = None
    for desc in options:
        if codec == "auto-fast" and best is not None and "layout" in desc:
            piece = piece or _Slice(laid, _head(g, layout))
            if _hopeless(desc["codec"], laid, len(best[0]), piece):
                continue
        payload, desc = _encode_with(desc, g, laid if "layout" in desc else None)
        if best is None or len(payload) < len(best[0]):
            best = (payload, desc)
    assert best is not None
    return best


def decoded_size(kind: str, desc: dict, shapes: list[tuple], dtypes: list[str]) -> int:
    """Exact bytes a byte codec must return for this group: the bound its decoder enforces."""
    if kind == "side":
        return sum(math.prod(s) * np.dtype(d).itemsize for s, d in zip(shapes, dtypes))
    return encoded_size(_shapes2d(shapes), dtypes, Layout.from_dict(desc["layout"]))


def _shapes2d(shapes: list[tuple]) -> list[tuple[int, int]]:
    """The shapes :func:`_as_2d` gives, from the numbers alone (nothing allocated)."""
    out = []
    for s in shapes:
        s = tuple(int(x) for x in s)
        out.append(s if len(s) == 2 else (1, math.prod(s)) if len(s) <= 1 else (s[0], math.prod(s[1:])))
    return out


def decode_group(desc: dict, payload: bytes, kind: str, shapes: list[tuple], dtypes: list[str], lo: int, hi: int) -> list[np.ndarray]:
    name = desc["codec"]
    if name in SYMBOL_DECODERS:
        if kind == "side":
            raise ArtifactError(f"codec {name} cannot hold a side group")
        arrays = SYMBOL_DECODERS[name](payload, _shapes2d(shapes), dtypes, lo, hi, desc)
        return [a.reshape(s) for a, s in zip(arrays, shapes)]
    if name not in BYTE_DECODERS:
        raise ArtifactError(f"unknown codec {name!r}")
    if kind == "side":
        raw = BYTE_DECODERS[name](payload, decoded_size(kind, desc, shapes, dtypes))
        return _side_decode(raw, desc.get("shuffle", False), shapes, dtypes)
    return decode_laid_out(desc, payload, shapes, dtypes, lo)


def decode_laid_out(desc: dict, payload: bytes, shapes: list[tuple], dtypes: list[str], lo: int) -> list[np.ndarray]:
    """A symbol group a byte codec holds: decode the bytes, then undo the byte layout.

    Its own function so an exported decoder for an artifact with no such group can leave the
    layouts out (pgolf_pack.ship).
    """
    lay = Layout.from_dict(desc["layout"])
    raw = BYTE_DECODERS[desc["codec"]](payload, encoded_size(_shapes2d(shapes), dtypes, lay))
    arrays = layout_decode(raw, lay, _shapes2d(shapes), dtypes, lo)
    return [a.reshape(s) for a, s in zip(arrays, shapes)]


# --- whole model -----------------------------------------------------------------------------------


@dataclass
class PackResult:
    blob: bytes
    manifest: dict


def _check_codec(codec: str) -> None:
    if codec not in AUTO_MODES and codec not in codecs.CODECS:
        raise PgolfError(f"unknown codec {codec!r}; choose one of {', '.join(AUTO_MODES + tuple(codecs.CODECS))}")
    if codec not in AUTO_MODES and not codecs.get(codec).available():
        raise PgolfError(codecs.get(codec).missing or f"codec {codec} is not available here")


def pack_model(
    qm: QuantizedModel,
    codec: str = "auto",
    grouping: str = "role",
    choices: dict[str, dict] | None = None,
    workers: int = 2,
    on_group: Callable[[str], None] | None = None,
) -> PackResult:
    """Encode every group and assemble the artifact. ``choices`` pins group descriptors (re-pack)."""
    _check_codec(codec)
    groups = build_groups(qm, grouping)

    def work(g: Group) -> tuple[bytes, dict]:
        res = encode_group(g, codec, (choices or {}).get(g.name))
        if on_group:
            on_group(g.name)
        return res

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        # Largest groups first, so the last one to start is small and the workers finish together;
        # the artifact keeps the groups' own order.
        by_size = sorted(range(len(groups)), key=lambda i: -groups[i].raw_bytes)
        started = {i: ex.submit(work, groups[i]) for i in by_size}
        futures = [started[i] for i in range(len(groups))]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception() is not None:
                    raise f.exception()
            results = [f.result() for f in futures]
        except BaseException:
            # Fail fast: drop the groups not started and kill running external coders, instead
            # of waiting for every other group to finish (lrzip: minutes).
            ex.shutdown(wait=False, cancel_futures=True)
            codecs.kill_running()
            raise
    manifest = build_manifest(qm, groups, grouping, [desc for _, desc in results])
    blob = write_container(manifest, [p for p, _ in results])
    return PackResult(blob, manifest)


def build_manifest(qm: QuantizedModel, groups: list[Group], grouping: str, descs: list[dict]) -> dict:
    """The manifest for ``qm`` laid out in ``groups``, each encoded as its descriptor says.

    The one place a manifest is assembled: the packer and the byte predictor both call it, so a
    predicted container differs from the real one only in its payloads.
    """
    where: dict[tuple[str, str], tuple[int, int]] = {}
    gentries = []
    for gi, (g, desc) in enumerate(zip(groups, descs)):
        for mi, m in enumerate(g.members):
            where[m] = (gi, mi)
        gentries.append(
            {"name": g.name, "kind": g.kind, "lo": g.lo, "hi": g.hi, "raw_bytes": g.raw_bytes,
             "raw_crc32": _raw_crc(g.arrays), **desc,
             "codec_params": codecs.codec_params(desc["codec"])}
        )
    tentries = []
    for t in qm.tensors:
        streams = {}
        for sname, s in t.streams.items():
            gi, mi = where[(t.name, sname)]
            streams[sname] = {"group": gi, "index": mi, "shape": list(s.data.shape), "dtype": s.data.dtype.str,
                              "kind": s.kind, "lo": s.lo, "hi": s.hi}
        tentries.append({"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "scheme": t.scheme,
                         "params": t.params, "streams": streams})
    return {"format": FORMAT_VERSION, "grouping": grouping, "tensors": tentries, "groups": gentries, "meta": qm.meta}


def _group_members(manifest: dict) -> list[list[tuple[int, str, dict]]]:
    members: list[list[tuple[int, str, dict]]] = [[] for _ in manifest["groups"]]
    for ti, t in enumerate(manifest["tensors"]):
        for sname, s in t["streams"].items():
            members[s["group"]].append((s["index"], sname, {"tensor": ti, **s}))
    for m in members:
        m.sort(key=lambda x: x[0])
    return members


def unpack_model(blob: bytes, workers: int = 2, max_decoded_bytes: int | None = None) -> tuple[QuantizedModel, dict]:
    """Decode an artifact back into quantized tensors; every group's checksums are verified.

    Order matters for hostile files: the whole manifest is validated first (``read_container``),
    then every payload checksum, and only then does any decoder run; the first group that fails
    cancels the ones not yet started. ``max_decoded_bytes``: see :func:`.container.read_container`.
    """
    manifest, payload = read_container(blob, max_decoded_bytes)
    members = _group_members(manifest)
    datas = [group_payload(g, payload) for g in manifest["groups"]]

    stop = threading.Event()

    def work(gi: int) -> list[np.ndarray] | None:
        # After the first failure every group still queued returns at once instead of decoding.
        if stop.is_set():
            return None
        try:
            return decode_one(gi)
        except BaseException:
            stop.set()
            raise

    def decode_one(gi: int) -> list[np.ndarray]:
        g = manifest["groups"][gi]
        shapes = [tuple(m[2]["shape"]) for m in members[gi]]
        dtypes = [m[2]["dtype"] for m in members[gi]]
        try:
            arrays = decode_group(g, datas[gi], g["kind"], shapes, dtypes, g["lo"], g["hi"])
        except ArtifactError as e:
            raise ArtifactError(f"group {g['name']} cannot be decoded: {e}") from None
        except Exception as e:  # a codec library's own error on damaged data
            raise ArtifactError(f"group {g['name']} cannot be decoded ({type(e).__name__}: {e})") from None
        if _raw_crc(arrays) != g["raw_crc32"]:
            raise ArtifactError(f"group {g['name']} decoded to wrong data (checksum mismatch)")
        return arrays

    ex = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [ex.submit(work, gi) for gi in range(len(datas))]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f in done and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        decoded = [f.result() for f in futures]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
    tensors = []
    for t in manifest["tensors"]:
        streams = {}
        for sname, s in t["streams"].items():
            streams[sname] = Stream(decoded[s["group"]][s["index"]], s["kind"], s["lo"], s["hi"])
        tensors.append(QuantizedTensor(t["name"], tuple(t["shape"]), t["dtype"], t["scheme"], t["params"], streams))
    return QuantizedModel(tensors, manifest.get("meta", {})), manifest


def group_choices(manifest: dict) -> dict[str, dict]:
    """The recorded (codec, layout) per group, to re-pack byte-identically."""
    keep = ("codec", "layout", "shuffle") + tuple(f for c in codecs.CODECS.values() for f in c.records)
    return {g["name"]: {k: g[k] for k in keep if k in g} for g in manifest["groups"]}


def attribute_bytes(blob: bytes, manifest: dict) -> tuple[dict[str, int], int]:
    """Split each group's payload bytes over its tensors by raw size (largest remainder).

    Returns (bytes per tensor, header+manifest bytes); the values sum to ``len(blob)`` exactly.
    """
    per: dict[str, int] = {t["name"]: 0 for t in manifest["tensors"]}
    members = _group_members(manifest)
    for g, mem in zip(manifest["groups"], members):
        sizes = [int(np.prod(m[2]["shape"])) * np.dtype(m[2]["dtype"]).itemsize for m in mem]
        total = sum(sizes) or 1
        exact = [g["length"] * s / total for s in sizes]
        base = [int(x) for x in exact]
        rest = g["length"] - sum(base)
        for i in sorted(range(len(mem)), key=lambda i: (base[i] - exact[i], i))[:rest]:
            base[i] += 1
        for m, b in zip(mem, base):
            per[manifest["tensors"][m[2]["tensor"]]["name"]] += b
    return per, header_bytes(blob)
