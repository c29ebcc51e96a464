"""Imports every scheme module so their dequantizers are registered before decoding."""

from . import passthrough, rtn  # noqa: F401
