"""Registers the quantization methods that live in their own modules (imported lazily, so a plain
RTN run never pays for their imports)."""

from __future__ import annotations

from .checkpoint import dtype_name, to_float32
from .pipeline import register_method


@register_method("gptq")
def _gptq(name, t, spec, H):
    from .quant.gptq import gptq_quantize

    return gptq_quantize(name, to_float32(t), dtype_name(t.dtype), H, spec.get("bits", 6), spec.get("clip", "sdclip"),
                         spec.get("sigmas"), spec.get("block_size", 128), spec.get("damp", 0.01), spec.get("act_order", True))


@register_method("e8p")
def _e8p(name, t, spec, H):
    from .quant.e8p import quantize_e8p

    return quantize_e8p(name, to_float32(t), dtype_name(t.dtype), H, rht=spec.get("rht", True), seed=spec.get("seed", 0),
                        ldlq=spec.get("ldlq", True) and H is not None)
