"""Tensors kept in float (1-D controls, small matrices): stored bit-exact or as float16."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import dtype_name, torch_dtype
from .base import QuantizedTensor, Stream, register_scheme

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
