"""The importable API behind ``pgolf-pack quantize``: plan → quantize → pack → report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from . import CAP_BYTES, __version__
from .checkpoint import check_finite, dtype_name, load_checkpoint, to_float32
from .errors import PgolfError
from .fileio import atomic_write_bytes, check_not_input
from .pack.packer import attribute_bytes, pack_model
from .quant.base import QuantizedModel, QuantizedTensor, dequantize_float32
from .quant.passthrough import store_float
from .quant.rtn import quantize_rtn
from .recipe import Recipe, plan

MethodFn = Callable[[str, torch.Tensor, dict, "np.ndarray | None"], QuantizedTensor]
_METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        _METHODS[name] = fn
        return fn

    return deco


@register_method("float")
def _float(name, t, spec, H):
    return store_float(name, t)


@register_method("fp16")
def _fp16(name, t, spec, H):
    return store_float(name, t, as_fp16=True)


@register_method("rtn")
def _rtn(name, t, spec, H):
    col_weight = np.diag(H).astype(np.float32) if H is not None else None
    return quantize_rtn(name, to_float32(t), dtype_name(t.dtype), spec.get("bits", 6), spec.get("clip", "sdclip"),
                        spec.get("sigmas"), col_weight)


def _method(name: str) -> MethodFn:
    if name not in _METHODS:
        # Heavier schemes register themselves on import.
        from . import methods  # noqa: F401
    if name not in _METHODS:
        raise PgolfError(f"quantization method {name!r} is not available")
    return _METHODS[name]


NEEDS_HESSIAN = {"gptq"}


def quantize_tensors(
    tensors: Mapping[str, torch.Tensor],
    recipe: Recipe,
    hessians: Mapping[str, np.ndarray] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> QuantizedModel:
    """Quantize every tensor as the recipe says. Tensors keep checkpoint order."""
    check_finite(tensors)
    specs = plan(tensors, recipe)
    for name, spec in specs.items():
        if spec["method"] in NEEDS_HESSIAN and (hessians is None or name not in hessians):
            what = "no Hessian file was given (--hessians)" if hessians is None else "the Hessian file has no entry for it"
            raise PgolfError(f"method {spec['method']} for {name} needs a Hessian, but {what}")
    out = []
    for name, t in tensors.items():
        spec = specs[name]
        H = hessians.get(name) if hessians is not None else None
        if H is not None and spec["method"] not in ("float", "fp16") and H.shape != (t.shape[1], t.shape[1]):
            raise PgolfError(f"Hessian for {name} has shape {tuple(H.shape)}, expected {(t.shape[1], t.shape[1])}")
        qt = _method(spec["method"])(name, t, spec, H)
        if "group" in spec:
            qt.params["group"] = spec["group"]
        out.append(qt)
        if on_tensor:
            on_tensor(name)
    return QuantizedModel(out, {"pgolf_pack": __version__, "recipe": recipe.to_dict()})


@dataclass
class TensorRow:
    name: str
    shape: tuple
    params: int
    scheme: str
    bytes: int
    bits_per_param: float
    rel_error: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class PackReport:
    rows: list[TensorRow]
    header_bytes: int
    total_bytes: int
    cap: int = CAP_BYTES
    groups: list[dict] = field(default_factory=list)

    @property
    def margin(self) -> int:
        return self.cap - self.total_bytes

    def to_dict(self) -> dict:
        return {"tensors": [r.to_dict() for r in self.rows], "header_bytes": self.header_bytes,
                "total_bytes": self.total_bytes, "cap": self.cap, "margin": self.margin, "groups": self.groups}


def scheme_label(qt: QuantizedTensor) -> str:
    p = qt.params
    if qt.scheme == "float":
        return p.get("stored", qt.dtype)
    label = f"{p.get('method', qt.scheme)} int{p['bits']}" if "bits" in p else f"{p.get('method', qt.scheme)}"
    if p.get("clip") == "sdclip" and "sigmas" in p:
        label += f" {p['sigmas']:.2f}σ"
    elif p.get("clip"):
        label += f" {p['clip']}"
    if "lqer" in p:
        label += f" +lqer r{p['lqer']['rank']}"
    return label


def relative_error(orig: torch.Tensor, qt: QuantizedTensor) -> float:
    w = to_float32(orig).astype(np.float64)
    d = w - dequantize_float32(qt).astype(np.float64)
    n = float(np.sqrt((w * w).sum()))
    return float(np.sqrt((d * d).sum()) / n) if n > 0 else float(np.sqrt((d * d).sum()))


def report(blob: bytes, manifest: dict, qm: QuantizedModel, originals: Mapping[str, torch.Tensor] | None) -> PackReport:
    per, head = attribute_bytes(blob, manifest)
    rows = []
    for qt in qm.tensors:
        b = per[qt.name]
        err = relative_error(originals[qt.name], qt) if originals is not None and qt.name in originals else float("nan")
        rows.append(TensorRow(qt.name, qt.shape, qt.numel, scheme_label(qt), b, 8.0 * b / max(qt.numel, 1), err))
    groups = [{k: g[k] for k in ("name", "codec", "raw_bytes", "length")} for g in manifest["groups"]]
    return PackReport(rows, head, len(blob), groups=groups)


def quantize_file(
    ckpt: str | Path,
    out: str | Path,
    recipe: Recipe,
    codec: str = "auto",
    grouping: str = "role",
    hessians: Mapping[str, np.ndarray] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    on_group: Callable[[str], None] | None = None,
) -> PackReport:
    check_not_input(Path(out), Path(ckpt))
    tensors = load_checkpoint(ckpt)
    qm = quantize_tensors(tensors, recipe, hessians, on_tensor)
    res = pack_model(qm, codec=codec, grouping=grouping, on_group=on_group)
    atomic_write_bytes(out, res.blob)
    return report(res.blob, res.manifest, qm, tensors)
