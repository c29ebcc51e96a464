"""The exported decoder's entry point; the package reads artifacts through the very same calls."""

from __future__ import annotations

from pathlib import Path

from ..pack.packer import unpack_model
from ..verify import dequantize_model


def load(src) -> dict:
    """The state dict of a ``.pgp`` artifact (a path, or its bytes), each tensor in its original
    dtype. Every checksum is verified; a damaged artifact raises ArtifactError."""
    blob = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
    qm, _ = unpack_model(blob)
    return dequantize_model(qm)
