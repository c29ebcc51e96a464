"""Quantization schemes. Each turns a float matrix into integer symbol streams plus side data."""

from .base import QuantizedModel, QuantizedTensor, Stream, dequantize_tensor, register_scheme

__all__ = ["QuantizedModel", "QuantizedTensor", "Stream", "dequantize_tensor", "register_scheme"]
