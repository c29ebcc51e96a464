"""The data every quantizer produces and every packer consumes.

A :class:`QuantizedTensor` is plain data: a scheme name, JSON-able parameters and named numpy
streams. ``symbols`` streams hold integer codes the packer groups and entropy-codes; ``side``
streams (scales, factors, permutations) go to the remainder group. Decoding a tensor needs only
this data and the scheme's registered dequantizer, so packers never need to know the schemes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..checkpoint import torch_dtype
from ..errors import ArtifactError


@dataclass
class Stream:
    data: np.ndarray
    kind: str = "side"  # "symbols" | "side"
    lo: int = 0  # inclusive symbol range, meaningful for "symbols" streams
    hi: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("symbols", "side"):
            raise ValueError(f"unknown stream kind {self.kind!r}")
        self.data = np.ascontiguousarray(self.data)


@dataclass
class QuantizedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the original dtype name, restored on dequantize
    scheme: str
    params: dict = field(default_factory=dict)
    streams: dict[str, Stream] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def raw_bytes(self, kind: str | None = None) -> int:
        return sum(s.data.nbytes for s in self.streams.values() if kind is None or s.kind == kind)


@dataclass
class QuantizedModel:
    tensors: list[QuantizedTensor]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> QuantizedTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


Dequantizer = Callable[[QuantizedTensor], np.ndarray]
Correction = Callable[[QuantizedTensor, np.ndarray], np.ndarray]

_SCHEMES: dict[str, Dequantizer] = {}
# Corrections (e.g. LQER low-rank terms) stack on top of any scheme; keyed by a params entry.
_CORRECTIONS: dict[str, Correction] = {}


def register_scheme(name: str) -> Callable[[Dequantizer], Dequantizer]:
    def deco(fn: Dequantizer) -> Dequantizer:
        _SCHEMES[name] = fn
        return fn

    return deco


def register_correction(key: str) -> Callable[[Correction], Correction]:
    def deco(fn: Correction) -> Correction:
        _CORRECTIONS[key] = fn
        return fn

    return deco


def _ensure_schemes_loaded() -> None:
    # Importing the scheme modules registers their dequantizers.
    from . import registry  # noqa: F401


def dequantize_float32(qt: QuantizedTensor) -> np.ndarray:
    """Reconstruct the tensor as float32 numpy (corrections included)."""
    _ensure_schemes_loaded()
    fn = _SCHEMES.get(qt.scheme)
    if fn is None:
        raise ArtifactError(f"tensor {qt.name} uses unknown scheme {qt.scheme!r}; upgrade pgolf-pack")
    w = fn(qt)
    if isinstance(w, torch.Tensor):
        w = w.to(torch.float32).numpy()
    for key, corr in _CORRECTIONS.items():
        if key in qt.params:
            w = corr(qt, w)
    return np.asarray(w, dtype=np.float32).reshape(qt.shape)


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    """Reconstruct the tensor in its original dtype."""
    _ensure_schemes_loaded()
    if qt.scheme == "float":
        return _SCHEMES["float"](qt)  # type: ignore[return-value]  # exact passthrough
    return torch.from_numpy(dequantize_float32(qt)).to(torch_dtype(qt.dtype))
