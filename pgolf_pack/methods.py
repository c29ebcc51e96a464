"""Registers the quantization methods that live in their own modules (imported lazily, so a plain
RTN run never pays for their imports)."""

from __future__ import annotations

from .checkpoint import dtype_name, to_float32
from .pipeline import register_method


@register_method("gptq")
def _gptq(name, t, spec, H, device=None):
    from .quant.gptq import gptq_quantize

    return gptq_quantize(name, to_float32(t), dtype_name(t.dtype), H, spec.get("bits", 6), spec.get("clip", "sdclip"),
                         spec.get("sigmas"), spec.get("block_size", 128), spec.get("damp", 0.01), spec.get("act_order", True),
                         device=device)


@register_method("e8p")
def _e8p(name, t, spec, H):
    from .quant.e8p import quantize_e8p

    return quantize_e8p(name, to_float32(t), dtype_name(t.dtype), H, rht=spec.get("rht", True), seed=spec.get("seed", 0),
                        ldlq=spec.get("ldlq", True) and H is not None)


@register_method("ecsq")
def _ecsq(name, t, spec, H, device=None):
    from .quant.ecsq import as_prepared, ecsq_codes, make_ecsq_tensor, make_grid
    from .quant.rdoq import natural_lambda, rdoq_codes

    w = to_float32(t)
    prep = as_prepared(name, w, H, spec.get("damp", 0.01), spec.get("act_order", True), device)
    grid = make_grid(w, spec.get("delta", 0.35), prep, spec.get("row_mode", "flat"),
                     spec.get("col_beta", 1.0 if prep is not None else 0.0))
    gain = float(spec.get("rdoq", 0.0))  # RDOQ λ as a multiple of the step's own slope; 0 = plain rounding
    params = {"gptq": prep is not None}
    if gain:
        lam = gain * natural_lambda(grid, prep)
        q, _ = rdoq_codes(w, grid, prep, lam, spec.get("iters", 1), spec.get("rate_model", "col"), spec.get("block_size", 128),
                          name=name, device=device)
        params["rdoq"] = {"gain": gain, "lambda": lam, "iters": int(spec.get("iters", 1))}
    else:
        q = ecsq_codes(w, grid, prep, block_size=spec.get("block_size", 128), name=name, device=device)
    return make_ecsq_tensor(name, w.shape, dtype_name(t.dtype), q, grid, params)


@register_method("trellis")
def _trellis(name, t, spec, H, device=None):
    from .quant.ecsq import as_prepared, make_grid
    from .quant.rdoq import natural_lambda
    from .quant.trellis import quantize_trellis

    w = to_float32(t)
    prep = as_prepared(name, w, H, spec.get("damp", 0.01), spec.get("act_order", True), device)
    beta = spec.get("col_beta", 1.0 if prep is not None else 0.0)
    delta = spec.get("delta", 0.35)
    lam = float(spec.get("rdoq", 0.5)) * natural_lambda(make_grid(w, delta, prep, spec.get("row_mode", "flat"), beta), prep)
    return quantize_trellis(name, w, dtype_name(t.dtype), delta, lam, prep, spec.get("row_mode", "flat"), beta,
                            iters=spec.get("iters", 1), coding=spec.get("coding", "plain"), block_size=spec.get("block_size", 128),
                            device=device)
