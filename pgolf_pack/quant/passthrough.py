"""Tensors kept in float (1-D controls, small matrices): stored bit-exact or as float16."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import DTYPE_NAMES, FLOAT_DTYPES, dtype_name, torch_dtype
from .base import QuantizedTensor, Stream, register_check, register_scheme
from .spec import Check

# numpy has no bfloat16: such tensors travel as their raw 16-bit patterns.
_VIEW_AS = {torch.bfloat16: torch.int16}


def store_float(name: str, t: torch.Tensor, as_fp16: bool = False) -> QuantizedTensor:
    orig = dtype_name(t.dtype)
    if as_fp16 and t.is_floating_point():
        t = t.to(torch.float16)
    stored = dtype_name(t.dtype)
    view = t.contiguous().view(_VIEW_AS[t.dtype]) if t.dtype in _VIEW_AS else t.contiguous()
    data = view.numpy().reshape(-1).copy()
    return QuantizedTensor(
        name=name,
        shape=tuple(t.shape),
        dtype=orig,
        scheme="float",
        params={"stored": stored},
        streams={"data": Stream(data, "side")},
    )


@register_scheme("float")
def dequantize_float(qt: QuantizedTensor) -> torch.Tensor:
    stored = torch_dtype(qt.params["stored"])
    arr = torch.from_numpy(np.ascontiguousarray(qt.streams["data"].data).copy())
    if stored in _VIEW_AS:
        arr = arr.view(stored)
    return arr.reshape(qt.shape).to(torch_dtype(qt.dtype))


# The numpy dtype each stored dtype travels as.
_STREAM_DTYPE = {dtype_name(d): ("<i2" if d in _VIEW_AS else torch.empty(0, dtype=d).numpy().dtype.str) for d in DTYPE_NAMES}
_FLOAT_NAMES = tuple(dtype_name(d) for d in FLOAT_DTYPES)


@register_check("float")
def check_float(c: Check) -> None:
    stored = c.choice_param("stored", tuple(_STREAM_DTYPE))
    out = c.spec.dtype
    # Only a float may be narrowed to float16 on the way in; anything else is stored as itself.
    if stored != out and not (stored == "float16" and out in _FLOAT_NAMES):
        c.fail(f"stored as {stored} but restored as {out}")
    c.stream("data", (c.spec.numel,), (_STREAM_DTYPE[stored],), "side", (0, 0))
