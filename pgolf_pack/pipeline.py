"""Recipe quantization of a state dict, and the per-tensor report of a packed artifact (the
building blocks of :mod:`pgolf_pack.api`, which runs every quantize path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from . import CAP_BYTES, __version__
from .checkpoint import check_finite, dtype_name, to_float32
from .errors import PgolfError
from .pack.packer import attribute_bytes
from .quant.base import QuantizedModel, QuantizedTensor, dequantize_float32
from .quant.passthrough import store_float
from .quant.rtn import quantize_rtn
from .recipe import Recipe, plan

MethodFn = Callable[[str, torch.Tensor, dict, "np.ndarray | None"], QuantizedTensor]
_METHODS: dict[str, MethodFn] = {}
# Methods with a torch sweep that can run on a GPU; they take a ``device`` keyword. The others
# (rtn, e8p, float, fp16) are numpy work and always run on the CPU.
DEVICE_METHODS = ("gptq", "ecsq", "trellis")


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
ROW_BITS_METHODS = ("rtn", "gptq")  # the int-k schemes that per-row bit tiers refine


@dataclass
class LqerOptions:
    """Global LQER selection: the ``top_k`` most damaged quantized tensors get rank-``rank`` factors."""

    top_k: int = 0
    rank: int = 4
    bits: int = 4
    group: int = 64
    weighted: str | bool = False  # False, "diag" or "chol": fit the factors in the Hessian norm

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.rank < 1 or self.group < 1 or not 2 <= self.bits <= 8:
            raise PgolfError(f"LQER needs top_k >= 0, rank >= 1, bits in 2..8 and group >= 1, got {self}")
        if self.weighted not in (False, "diag", "chol"):
            raise PgolfError(f"LQER weighting must be False, 'diag' or 'chol', got {self.weighted!r}")


def _row_ranking(name: str, w: np.ndarray, spec: dict, token_freq: np.ndarray | None) -> np.ndarray:
    from .quant.mixed_rows import parse_row_bits, row_damage

    tiers = parse_row_bits(spec["row_bits"])
    low = min(t.bits for t in tiers)
    if token_freq is not None and token_freq.shape[0] <= w.shape[0]:
        # Counts cover the ids seen in the shards; ids never seen count zero.
        freq = np.zeros(w.shape[0])
        freq[: token_freq.shape[0]] = token_freq
    else:
        # Without token counts (or for a non-vocabulary tensor) every row is equally likely to be used.
        freq = np.ones(w.shape[0])
    # Frequency × the error the low tier would add: frequent rows with large error get the bits.
    return row_damage(w, freq + 1.0, low, clip=spec.get("clip", "sdclip"), sigmas=spec.get("sigmas"))


def _apply_e8p_fallbacks(qm: QuantizedModel, specs: dict, tensors, hessians) -> list[str]:
    """Send the ``fallback`` E8P matrices with the worst rotated-VQ error to int-``fallback_bits``.

    The count is one budget over all E8P matrices (the largest ``fallback`` any of their specs
    asks for), because which tensors suffer most is only known after all are quantized. The
    error is Hessian-weighted where a Hessian exists, so layers compare on the proxy loss.
    """
    from .quant.e8p import vq_error

    pool = [i for i, t in enumerate(qm.tensors) if t.scheme == "e8p"]
    budget = max((int(specs[qm.tensors[i].name].get("fallback", 0)) for i in pool), default=0)
    if budget <= 0:
        return []
    hessians = hessians or {}
    errs = []
    for i in pool:
        t = qm.tensors[i]
        errs.append((vq_error(to_float32(tensors[t.name]), t, hessians.get(t.name), specs[t.name].get("damp", 0.01)), i))
    fallen = []
    for err, i in sorted(errs, reverse=True)[:budget]:
        name = qm.tensors[i].name
        spec = specs[name]
        H = hessians.get(name)
        sub = {"bits": int(spec.get("fallback_bits", 4)), "clip": spec.get("clip", "sdclip")}
        qt = _method("gptq" if H is not None else "rtn")(name, tensors[name], sub, H)
        qt.params["fallback_from"] = {"method": "e8p", "rel_error": round(float(err), 6)}
        if "group" in spec:
            qt.params["group"] = spec["group"]
        qm.tensors[i] = qt
        fallen.append(name)
    return fallen


def _apply_lqer_specs(qm: QuantizedModel, specs: dict, tensors, hessians, lqer: LqerOptions | None) -> list[dict]:
    from .quant.lqer import apply_lqer

    rows: list[dict] = []
    # Per-tensor requests from recipe rules (lqer_rank), batched by identical settings.
    batches: dict[tuple, list[str]] = {}
    for name, spec in specs.items():
        if spec.get("lqer_rank"):
            key = (int(spec["lqer_rank"]), int(spec.get("lqer_bits", 4)), int(spec.get("lqer_group", 64)),
                   spec.get("lqer_weighted", False))
            batches.setdefault(key, []).append(name)
    for (rank, bits, group, weighted), names in batches.items():
        rows += apply_lqer(qm, tensors, hessians, len(names), rank, bits, group, weighted, names=names)
    if lqer is not None and lqer.top_k > 0:
        done = {r["name"] for r in rows}
        pool = [t.name for t in qm.tensors if t.scheme != "float" and len(t.shape) == 2 and t.name not in done]
        rows += apply_lqer(qm, tensors, hessians, lqer.top_k, lqer.rank, lqer.bits, lqer.group, lqer.weighted, names=pool)
    return rows


def quantize_tensors(
    tensors: Mapping[str, torch.Tensor],
    recipe: Recipe,
    hessians: Mapping[str, np.ndarray] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    lqer: LqerOptions | None = None,
    token_freq: np.ndarray | None = None,
    device: "str | torch.device | None" = None,
) -> QuantizedModel:
    """Quantize every tensor as the recipe says. Tensors keep checkpoint order.

    ``lqer`` adds low-rank error correction to the most damaged tensors afterwards (recipe rules
    with ``lqer_rank`` request it per tensor); ``token_freq`` ranks embedding rows for ``row_bits``.
    ``device``: where the sweeps of :data:`DEVICE_METHODS` run (the CPU by default); per-row
    tiers, E8P fallbacks and LQER stay on the CPU.
    """
    check_finite(tensors)
    specs = plan(tensors, recipe)
    for name, spec in specs.items():
        if spec["method"] in NEEDS_HESSIAN and (hessians is None or name not in hessians):
            what = "no Hessian file was given (--hessians)" if hessians is None else "the Hessian file has no entry for it"
            raise PgolfError(f"method {spec['method']} for {name} needs a Hessian, but {what}")
        # Checked before any tensor is quantized, so a setting that would be ignored costs nothing.
        if spec.get("row_bits") and spec["method"] not in ROW_BITS_METHODS:
            raise PgolfError(f"row_bits for {name} applies to methods {', '.join(ROW_BITS_METHODS)}, not {spec['method']}")
        if spec.get("lqer_rank") and spec.get("lqer_weighted") and hessians is None:
            raise PgolfError(f"activation-weighted LQER for {name} needs Hessians (--hessians)")
    if lqer is not None and lqer.top_k > 0 and lqer.weighted and hessians is None:
        raise PgolfError("activation-weighted LQER needs Hessians (--hessians)")
    out = []
    for name, t in tensors.items():
        spec = specs[name]
        H = hessians.get(name) if hessians is not None else None
        if H is not None and spec["method"] not in ("float", "fp16") and H.shape != (t.shape[1], t.shape[1]):
            raise PgolfError(f"Hessian for {name} has shape {tuple(H.shape)}, expected {(t.shape[1], t.shape[1])}")
        if spec.get("row_bits"):
            from .quant.mixed_rows import quantize_mixed_rows

            w = to_float32(t)
            qt = quantize_mixed_rows(name, w, dtype_name(t.dtype), spec["row_bits"], _row_ranking(name, w, spec, token_freq),
                                     spec.get("clip", "sdclip"), spec.get("sigmas"),
                                     H if spec["method"] == "gptq" else None)
        elif device is not None and spec["method"] in DEVICE_METHODS:
            qt = _method(spec["method"])(name, t, spec, H, device=device)
        else:
            qt = _method(spec["method"])(name, t, spec, H)
        if "group" in spec:
            qt.params["group"] = spec["group"]
        out.append(qt)
        if on_tensor:
            on_tensor(name)
    qm = QuantizedModel(out, {"pgolf_pack": __version__, "recipe": recipe.to_dict()})
    fallen = _apply_e8p_fallbacks(qm, specs, tensors, hessians)
    if fallen:
        qm.meta["e8p_fallback"] = fallen
    lqer_rows = _apply_lqer_specs(qm, specs, tensors, hessians, lqer)
    if lqer_rows:
        qm.meta["lqer"] = [r["name"] for r in lqer_rows]
    return qm


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
    if "row_bits" in p:  # per-row tiers: the plan says more than its widest tier's bits
        label = f"{p.get('method', qt.scheme)} rows {p['row_bits']}"
    elif "bits" in p:
        label = f"{p.get('method', qt.scheme)} int{p['bits']}"
    else:
        label = f"{p.get('method', qt.scheme)}"
    if p.get("clip") == "sdclip" and "sigmas" in p:
        label += f" {p['sigmas']:.2f}σ"
    elif p.get("clip"):
        label += f" {p['clip']}"
    if p.get("rdoq"):
        label += "+rdoq"
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
