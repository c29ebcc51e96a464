"""Where the bytes of an artifact go: per-tensor symbol, side and header bytes, plus symbol entropy.

Every payload byte of a group is attributed to its (tensor, stream) members with the
largest-remainder rule, so the rows plus the header+manifest line add up to the artifact size
exactly. Symbol groups are split in proportion to each member's order-0 entropy (n·H0: what it
would cost coded alone), so a layer whose symbols are cheaper shows fewer bytes; ``split="raw"``
splits by raw size instead, like :func:`pgolf_pack.pack.packer.attribute_bytes` (the ``quantize``
report). Side groups (scales, float data) are always split by raw size.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from .. import CAP_BYTES
from ..checkpoint import load_checkpoint
from ..errors import PgolfError
from ..fileio import atomic_write_bytes
from ..pack.container import MAGIC, header_bytes
from ..pack.packer import pack_model, unpack_model
from ..pipeline import quantize_tensors, relative_error, scheme_label
from ..quant.base import QuantizedModel, QuantizedTensor
from ..recipe import Recipe

SORT_KEYS = ("bytes", "name", "params", "bpp", "order")
SPLITS = ("entropy", "raw")


def _largest_remainder(total: int, sizes: list[float]) -> list[int]:
    denom = sum(sizes) or 1
    exact = [total * s / denom for s in sizes]
    base = [int(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (base[i] - exact[i], i))[: total - sum(base)]:
        base[i] += 1
    return base


def attribute_stream_bytes(
    blob: bytes, manifest: dict, weights: Mapping[tuple[str, str], float] | None = None
) -> tuple[dict[str, dict[str, int]], int]:
    """Payload bytes per tensor and stream, and header+manifest bytes; they sum to ``len(blob)``.

    A group is split by ``weights[(tensor, stream)]`` when every member has a positive weight,
    otherwise by raw size.
    """
    members: list[list[tuple[int, str, str, int]]] = [[] for _ in manifest["groups"]]
    for t in manifest["tensors"]:
        for sname, s in t["streams"].items():
            raw = int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize
            members[s["group"]].append((s["index"], t["name"], sname, raw))
    per: dict[str, dict[str, int]] = {t["name"]: {} for t in manifest["tensors"]}
    for g, mem in zip(manifest["groups"], members):
        mem.sort(key=lambda m: m[0])
        w = [(weights or {}).get((m[1], m[2]), 0.0) for m in mem]
        sizes = w if all(x > 0 for x in w) else [m[3] for m in mem]
        for (_, tname, sname, _), b in zip(mem, _largest_remainder(g["length"], sizes)):
            per[tname][sname] = per[tname].get(sname, 0) + b
    return per, header_bytes(blob)


def entropy_weights(qm: QuantizedModel) -> dict[tuple[str, str], float]:
    """n·H0 bits of every symbol stream: how a symbol group's bytes are split over its members."""
    return {(t.name, s): zeroth_order_entropy(v.data) * v.data.size
            for t in qm.tensors for s, v in t.streams.items() if v.kind == "symbols"}


def zeroth_order_entropy(a: np.ndarray) -> float:
    """Empirical order-0 entropy of an integer array, in bits per symbol."""
    a = np.asarray(a).reshape(-1)
    if a.size == 0:
        return 0.0
    a = a.astype(np.int64)
    counts = np.bincount(a - a.min())
    p = counts[counts > 0] / a.size
    return float(-(p * np.log2(p)).sum())


def symbol_entropy_bits(qt: QuantizedTensor) -> float | None:
    """Total order-0 entropy (bits) over a tensor's symbol streams; None if it has none."""
    streams = [s for s in qt.streams.values() if s.kind == "symbols"]
    if not streams:
        return None
    return sum(zeroth_order_entropy(s.data) * s.data.size for s in streams)


@dataclass
class SizeRow:
    name: str
    shape: tuple
    params: int
    scheme: str
    entropy_bpp: float | None  # order-0 entropy of the symbols, bits per parameter
    symbol_bytes: int
    side_bytes: int
    bytes: int
    share: float  # of the whole artifact
    rel_error: float = float("nan")
    order: int = 0

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes / max(self.params, 1)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "order"}
        return {**d, "shape": list(self.shape), "bits_per_param": self.bits_per_param}


@dataclass
class SizeReport:
    rows: list[SizeRow]
    header_bytes: int
    total_bytes: int
    source: str = ""
    codec: str = ""
    split: str = "entropy"
    cap: int = CAP_BYTES
    groups: list[dict] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "split": self.split,
            "total_bytes": self.total_bytes,
            "header_bytes": self.header_bytes,
            "symbol_bytes": sum(r.symbol_bytes for r in self.rows),
            "side_bytes": sum(r.side_bytes for r in self.rows),
            "total_params": self.total_params,
            "bits_per_param": 8.0 * self.total_bytes / max(self.total_params, 1),
            "cap": self.cap,
            "tensors": [r.to_dict() for r in self.rows],
            "groups": self.groups,
        }

    def sorted_rows(self, key: str = "bytes") -> list[SizeRow]:
        if key not in SORT_KEYS:
            raise PgolfError(f"unknown sort key {key!r}; choose one of {', '.join(SORT_KEYS)}")
        if key == "name":
            return sorted(self.rows, key=lambda r: r.name)
        if key == "order":
            return sorted(self.rows, key=lambda r: r.order)
        attr = {"bytes": lambda r: r.bytes, "params": lambda r: r.params, "bpp": lambda r: r.bits_per_param}[key]
        return sorted(self.rows, key=lambda r: (-attr(r), r.order))

    def to_csv(self, key: str = "order") -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["tensor", "shape", "params", "scheme", "entropy_bits_per_param", "symbol_bytes", "side_bytes",
                    "bytes", "share", "bits_per_param", "rel_error"])
        for r in self.sorted_rows(key):
            w.writerow([r.name, "x".join(map(str, r.shape)), r.params, r.scheme,
                        "" if r.entropy_bpp is None else f"{r.entropy_bpp:.6f}", r.symbol_bytes, r.side_bytes,
                        r.bytes, f"{r.share:.8f}", f"{r.bits_per_param:.6f}",
                        "" if r.rel_error != r.rel_error else f"{r.rel_error:.8f}"])
        w.writerow(["(header + manifest)", "", "", "", "", "", "", self.header_bytes,
                    f"{self.header_bytes / max(self.total_bytes, 1):.8f}", "", ""])
        w.writerow(["total", "", self.total_params, "", "", "", "", self.total_bytes, "1.00000000",
                    f"{8.0 * self.total_bytes / max(self.total_params, 1):.6f}", ""])
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike, key: str = "order") -> None:
        atomic_write_bytes(path, self.to_csv(key).encode())


def size_report(
    blob: bytes,
    manifest: dict,
    qm: QuantizedModel,
    originals: Mapping[str, torch.Tensor] | None = None,
    source: str = "",
    split: str = "entropy",
) -> SizeReport:
    if split not in SPLITS:
        raise PgolfError(f"unknown split {split!r}; choose entropy or raw")
    per, head = attribute_stream_bytes(blob, manifest, entropy_weights(qm) if split == "entropy" else None)
    kinds = {t["name"]: {s: v["kind"] for s, v in t["streams"].items()} for t in manifest["tensors"]}
    rows = []
    for i, qt in enumerate(qm.tensors):
        sym = sum(b for s, b in per[qt.name].items() if kinds[qt.name][s] == "symbols")
        side = sum(b for s, b in per[qt.name].items() if kinds[qt.name][s] != "symbols")
        h = symbol_entropy_bits(qt)
        err = relative_error(originals[qt.name], qt) if originals is not None and qt.name in originals else float("nan")
        rows.append(SizeRow(qt.name, tuple(qt.shape), qt.numel, scheme_label(qt),
                            None if h is None else h / max(qt.numel, 1), sym, side, sym + side,
                            (sym + side) / max(len(blob), 1), err, i))
    groups = [{k: g[k] for k in ("name", "kind", "codec", "raw_bytes", "length")} for g in manifest["groups"]]
    codecs = sorted({g["codec"] for g in manifest["groups"]})
    return SizeReport(rows, head, len(blob), source, "+".join(codecs), split=split, groups=groups)


def is_artifact(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass
class Packed:
    """An artifact in memory with its decoded view; ``originals`` only when made from a checkpoint."""

    blob: bytes
    manifest: dict
    qm: QuantizedModel
    originals: dict[str, torch.Tensor] | None
    source: str


def load_or_pack(
    path: str | os.PathLike,
    recipe: Recipe,
    codec: str = "auto-fast",
    grouping: str = "role",
    hessians: Mapping[str, np.ndarray] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Packed:
    """Read an artifact, or quantize + pack a checkpoint in memory with ``recipe``."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"input not found: {path}")
    if is_artifact(path):
        blob = path.read_bytes()
        qm, manifest = unpack_model(blob)
        return Packed(blob, manifest, qm, None, f"artifact {path}")
    tensors = load_checkpoint(path)
    qm = quantize_tensors(tensors, recipe, hessians, on_tensor)
    res = pack_model(qm, codec=codec, grouping=grouping)
    return Packed(res.blob, res.manifest, qm, tensors, f"checkpoint {path} packed in memory (codec {codec})")


def analyze_size(path: str | os.PathLike, recipe: Recipe, codec: str = "auto-fast", grouping: str = "role",
                 hessians: Mapping[str, np.ndarray] | None = None,
                 on_tensor: Callable[[str], None] | None = None, split: str = "entropy") -> SizeReport:
    p = load_or_pack(path, recipe, codec, grouping, hessians, on_tensor)
    return size_report(p.blob, p.manifest, p.qm, p.originals, p.source, split)
