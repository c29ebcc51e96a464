"""Imports every scheme module so their dequantizers are registered before decoding."""

from . import passthrough, rtn  # noqa: F401
from . import lqer, mixed_rows  # noqa: F401
from . import e8p  # noqa: F401
from . import ecsq, trellis  # noqa: F401
