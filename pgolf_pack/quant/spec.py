"""What a quantized tensor looks like before its data exists: shapes, dtypes and parameters.

An artifact's manifest describes every tensor as a :class:`TensorSpec`; each scheme registers a
check (:func:`.base.register_check`) that proves from the spec alone that its streams and
parameters imply exactly the tensor's shape, with every parameter the decoder uses bounded. The
manifest is validated this way before any payload is decoded, and the dequantizer runs the same
check on the real arrays, so no decoder ever broadcasts a stream into a bigger tensor than the
stream itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from ..errors import ArtifactError

# numpy dtype strings a stream may have (little-endian, what the packer writes on every machine).
INT_DTYPES = ("|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8")
SIDE_DTYPES = INT_DTYPES + ("<f2", "<f4", "<f8", "|b1")


@dataclass(frozen=True)
class StreamSpec:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string, e.g. "<f2"
    kind: str  # "symbols" | "side"
    lo: int = 0
    hi: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scheme: str
    params: dict
    streams: dict[str, StreamSpec]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Check:
    """One tensor's check in progress: helpers that fail with one line naming the tensor, and the
    streams claimed so far (every stream must be claimed by the scheme or a correction)."""

    spec: TensorSpec
    claimed: set[str] = field(default_factory=set)

    def fail(self, msg: str) -> NoReturn:
        raise ArtifactError(f"tensor {self.spec.name}: {msg}")

    def matrix(self) -> tuple[int, int]:
        """(rows, cols) of a scheme that stores 2-D matrices only; both at least 1."""
        s = self.spec.shape
        if len(s) != 2 or s[0] < 1 or s[1] < 1:
            self.fail(f"scheme {self.spec.scheme!r} needs a non-empty 2-D shape, got {list(s)}")
        return s[0], s[1]

    def has(self, name: str) -> bool:
        return name in self.spec.streams

    def stream(self, name: str, shape: tuple[int, ...] | None, dtypes: tuple[str, ...], kind: str | tuple[str, ...],
               lo_hi: tuple[int, int] | None = None) -> StreamSpec:
        """Claim stream ``name``; its shape (``None``: any 1-D), dtype, kind and range must match."""
        s = self.spec.streams.get(name)
        if s is None:
            self.fail(f"scheme {self.spec.scheme!r} needs a stream {name!r}")
        if name in self.claimed:
            self.fail(f"stream {name!r} is used twice")
        self.claimed.add(name)
        if shape is None:
            if len(s.shape) != 1:
                self.fail(f"stream {name} must be 1-D, got shape {list(s.shape)}")
        elif s.shape != tuple(shape):
            self.fail(f"stream {name} has shape {list(s.shape)}, the tensor needs {list(shape)}")
        if s.dtype not in dtypes:
            self.fail(f"stream {name} has dtype {s.dtype!r}, expected {' or '.join(dtypes)}")
        kinds = (kind,) if isinstance(kind, str) else kind
        if s.kind not in kinds:
            self.fail(f"stream {name} is {s.kind!r}, expected {' or '.join(kinds)}")
        if lo_hi is not None and (s.lo, s.hi) != tuple(lo_hi):
            self.fail(f"stream {name} claims symbol range [{s.lo}, {s.hi}], the parameters imply {list(lo_hi)}")
        return s

    def symbol_range(self, s: StreamSpec, name: str, lo: int, hi: int) -> None:
        """The stream's own [lo, hi] must be ordered and inside [lo, hi] (and its dtype's range)."""
        info = np.iinfo(np.dtype(s.dtype))
        if not (max(lo, int(info.min)) <= s.lo <= s.hi <= min(hi, int(info.max))):
            self.fail(f"stream {name} claims symbol range [{s.lo}, {s.hi}] outside [{max(lo, int(info.min))}, {min(hi, int(info.max))}]")

    # --- parameters ---

    def _get(self, params: dict, key: str, where: str):
        if key not in params:
            self.fail(f"{where} is missing {key!r}")
        return params[key]

    def int_param(self, key: str, lo: int, hi: int, params: dict | None = None, where: str = "params") -> int:
        v = self._get(self.spec.params if params is None else params, key, where)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(f"{where}.{key} must be an integer in {lo}..{hi}, got {v!r}")
        return v

    def bool_param(self, key: str, params: dict | None = None, where: str = "params") -> bool:
        v = self._get(self.spec.params if params is None else params, key, where)
        if not isinstance(v, bool):
            self.fail(f"{where}.{key} must be true or false, got {v!r}")
        return v

    def choice_param(self, key: str, choices: tuple, params: dict | None = None, where: str = "params",
                     default: object = None) -> object:
        p = self.spec.params if params is None else params
        if default is not None and key not in p:
            return default
        v = self._get(p, key, where)
        if not isinstance(v, str) or v not in choices:
            self.fail(f"{where}.{key} must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    def dict_param(self, key: str) -> dict:
        v = self._get(self.spec.params, key, "params")
        if not isinstance(v, dict):
            self.fail(f"params.{key} must be an object, got {type(v).__name__}")
        return v

    def list_param(self, key: str, lo: int, hi: int) -> list:
        v = self._get(self.spec.params, key, "params")
        if not isinstance(v, list) or not lo <= len(v) <= hi:
            self.fail(f"params.{key} must be a list of {lo}..{hi} entries, got {v!r:.80}")
        return v
