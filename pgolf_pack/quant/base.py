"""The data every quantizer produces and every packer consumes.

A :class:`QuantizedTensor` is plain data: a scheme name, JSON-able parameters and named numpy
streams. ``symbols`` streams hold integer codes the packer groups and entropy-codes; ``side``
streams (scales, factors, permutations) go to the remainder group. Decoding a tensor needs only
this data and the scheme's registered dequantizer, so packers never need to know the schemes.
Each scheme also registers a check (:func:`register_check`) that its streams and parameters imply
exactly the tensor's shape; artifacts are validated with it before decoding, and the dequantizer
runs it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..checkpoint import FLOAT_DTYPES, dtype_name, torch_dtype
from ..errors import ArtifactError
from .spec import Check, StreamSpec, TensorSpec


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

    def spec(self) -> TensorSpec:
        """The tensor as a manifest describes it: stream shapes and dtypes instead of data."""
        streams = {k: StreamSpec(tuple(s.data.shape), s.data.dtype.str, s.kind, s.lo, s.hi) for k, s in self.streams.items()}
        return TensorSpec(self.name, tuple(self.shape), self.dtype, self.scheme, self.params, streams)


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

SpecCheck = Callable[[Check], None]

_SCHEMES: dict[str, Dequantizer] = {}
# Corrections (e.g. LQER low-rank terms) stack on top of any scheme; keyed by a params entry.
_CORRECTIONS: dict[str, Correction] = {}
# Every scheme and correction also registers a check of its spec (see .spec); a scheme without
# one cannot be decoded, so no dequantizer ever runs on streams nobody has validated.
_CHECKS: dict[str, SpecCheck] = {}
_CORRECTION_CHECKS: dict[str, SpecCheck] = {}


def _register(table: dict, key: str) -> Callable:
    def deco(fn):
        table[key] = fn
        return fn

    return deco


def register_scheme(name: str) -> Callable[[Dequantizer], Dequantizer]:
    return _register(_SCHEMES, name)


def register_correction(key: str) -> Callable[[Correction], Correction]:
    return _register(_CORRECTIONS, key)


def register_check(scheme: str) -> Callable[[SpecCheck], SpecCheck]:
    """Register the check that a ``scheme`` tensor's streams and params imply exactly its shape."""
    return _register(_CHECKS, scheme)


def register_correction_check(key: str) -> Callable[[SpecCheck], SpecCheck]:
    return _register(_CORRECTION_CHECKS, key)


def known_schemes() -> list[str]:
    _ensure_schemes_loaded()
    return sorted(set(_SCHEMES) & set(_CHECKS))


def check_spec(spec: TensorSpec) -> None:
    """Raise ArtifactError (naming the tensor) unless ``spec`` is exactly what its scheme decodes:
    every stream the scheme and its corrections need, shaped as the tensor implies, and no other."""
    _ensure_schemes_loaded()
    c = Check(spec)
    fn = _CHECKS.get(spec.scheme) if spec.scheme in _SCHEMES else None
    if fn is None:
        c.fail(f"uses unknown scheme {spec.scheme!r}; known: {', '.join(known_schemes())}")
    if spec.scheme != "float" and spec.dtype not in [dtype_name(d) for d in FLOAT_DTYPES]:
        c.fail(f"scheme {spec.scheme!r} restores float tensors, not {spec.dtype!r}")
    fn(c)
    for key, corr in _CORRECTION_CHECKS.items():
        if key in spec.params:
            if spec.scheme == "float":
                c.fail(f"a float tensor cannot carry a {key!r} correction")
            corr(c)
    extra = sorted(set(spec.streams) - c.claimed)
    if extra:
        c.fail(f"has stream {extra[0]!r} that scheme {spec.scheme!r} does not use")


def _ensure_schemes_loaded() -> None:
    # Importing the scheme modules registers their dequantizers.
    from . import registry  # noqa: F401


def dequantize_float32(qt: QuantizedTensor) -> np.ndarray:
    """Reconstruct the tensor as float32 numpy (corrections included)."""
    check_spec(qt.spec())
    w = _SCHEMES[qt.scheme](qt)
    if isinstance(w, torch.Tensor):
        w = w.to(torch.float32).numpy()
    for key, corr in _CORRECTIONS.items():
        if key in qt.params:
            w = corr(qt, w)
    w = np.asarray(w, dtype=np.float32)
    if w.size != qt.numel:  # the checks make this unreachable; a new scheme's bug stays an error
        raise ArtifactError(f"tensor {qt.name}: decoded {w.size} values for shape {list(qt.shape)}")
    return w.reshape(qt.shape)


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    """Reconstruct the tensor in its original dtype."""
    _ensure_schemes_loaded()
    if qt.scheme == "float":
        check_spec(qt.spec())
        return _SCHEMES["float"](qt)  # type: ignore[return-value]  # exact passthrough
    return torch.from_numpy(dequantize_float32(qt)).to(torch_dtype(qt.dtype))
