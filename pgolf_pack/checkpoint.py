"""Load and save checkpoints (safetensors or ``torch.save`` state dicts) and classify tensors."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .errors import PgolfError
from .fileio import atomic_write

# The records keep everything of 65,536 elements or fewer in float; our default is lower so that
# small models (the bundled example, unit tests) still get their matrices quantized.
DEFAULT_MIN_NUMEL = 4096

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise PgolfError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise PgolfError(f"unsupported tensor dtype name {name!r}") from None


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        (hlen,) = struct.unpack("<Q", head[:8])
        if 2 <= hlen <= os.path.getsize(path) - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    return "unknown"


def _flatten_state_dict(obj) -> dict[str, torch.Tensor]:
    # Training scripts often save {"model": state_dict, ...} or {"state_dict": ...}.
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj:
                return _flatten_state_dict(obj[key])
    raise PgolfError("torch file does not hold a state dict of tensors")


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint into an ordered ``name -> tensor`` dict (CPU, original dtypes)."""
    path = Path(path)
    if not path.exists():
        raise PgolfError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise PgolfError(f"checkpoint is not a file: {path}")
    try:
        kind = _sniff(path)
    except OSError as e:
        raise PgolfError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise PgolfError(f"{path} is not a valid safetensors file: {e}") from None
    elif kind == "torch":
        try:
            # torch warns about pickle protocols on stderr; our own error below says what matters.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PgolfError(f"{path} is not a loadable weights-only torch state dict ({msg})") from None
        tensors = _flatten_state_dict(obj)
    else:
        raise PgolfError(f"{path} is not a checkpoint (expected safetensors or a torch.save state dict)")
    if not tensors:
        raise PgolfError(f"checkpoint {path} holds no tensors")
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.dtype in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise PgolfError(f"tensor {name} has {bad} non-finite values (NaN/Inf); refusing to quantize")


def is_quantizable(t: torch.Tensor, min_numel: int = DEFAULT_MIN_NUMEL) -> bool:
    """2-D float tensors above the size threshold are quantized; the rest pass through."""
    return t.dim() == 2 and t.dtype in FLOAT_DTYPES and t.numel() >= min_numel


def to_float32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    clean = {k: v.contiguous() for k, v in tensors.items()}
    md = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda p: save_file(clean, str(p), metadata=md or None))
