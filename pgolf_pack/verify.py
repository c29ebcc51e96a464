"""verify-roundtrip: decode an artifact, prove it re-encodes to the same bytes, measure its error."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, to_float32
from .errors import ArtifactError, PgolfError
from .pack.packer import group_choices, pack_model, unpack_model
from .quant.base import QuantizedModel, dequantize_float32, dequantize_tensor


def read_artifact(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"artifact not found: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise PgolfError(f"cannot read artifact {path}: {e.strerror}") from None


def dequantize_model(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    return {t.name: dequantize_tensor(t) for t in qm.tensors}


@dataclass
class TensorCheck:
    name: str
    shape: tuple
    rel_error: float
    max_abs_error: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class VerifyReport:
    artifact_bytes: int
    groups: int
    checksums_ok: bool
    repack_identical: bool
    decode_seconds: float
    repack_seconds: float
    tensors: list[TensorCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checksums_ok and self.repack_identical

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "tensors"}
        return {**d, "ok": self.ok, "tensors": [t.to_dict() for t in self.tensors]}


def verify_roundtrip(path: str | Path, against: str | Path | None = None, max_decoded_bytes: int | None = None) -> VerifyReport:
    """``max_decoded_bytes``: the decoding ceiling (default $PGOLF_MAX_DECODED_BYTES, else 4 GiB)."""
    blob = read_artifact(path)
    t0 = time.perf_counter()
    qm, manifest = unpack_model(blob, max_decoded_bytes=max_decoded_bytes)  # ArtifactError names the tensor or group
    deq = {t.name: dequantize_float32(t) for t in qm.tensors}
    t1 = time.perf_counter()
    again = pack_model(qm, choices=group_choices(manifest), grouping=manifest.get("grouping", "role"))
    t2 = time.perf_counter()
    checks: list[TensorCheck] = []
    if against is not None:
        orig = load_checkpoint(against)
        missing = set(orig) ^ set(deq)
        if missing:
            raise PgolfError(f"artifact and checkpoint hold different tensors (e.g. {sorted(missing)[0]})")
        for name in orig:
            w = to_float32(orig[name]).astype(np.float64)
            if tuple(w.shape) != tuple(deq[name].shape):
                raise PgolfError(f"tensor {name}: shape {tuple(deq[name].shape)} in the artifact, {tuple(w.shape)} in the checkpoint")
            d = w - deq[name]
            n = float(np.linalg.norm(w))
            checks.append(TensorCheck(name, tuple(w.shape), float(np.linalg.norm(d) / n) if n else float(np.linalg.norm(d)),
                                      float(np.abs(d).max()) if d.size else 0.0))
    return VerifyReport(len(blob), len(manifest["groups"]), True, again.blob == blob, t1 - t0, t2 - t1, checks)


def unpack_file(path: str | Path, out: str | Path, max_decoded_bytes: int | None = None) -> dict[str, torch.Tensor]:
    from .checkpoint import save_safetensors
    from .fileio import check_outputs

    check_outputs([out], [path])
    qm, _ = unpack_model(read_artifact(path), max_decoded_bytes=max_decoded_bytes)
    state = dequantize_model(qm)
    save_safetensors(state, out, {"source": "pgolf-pack unpack"})
    return state


__all__ = ["verify_roundtrip", "unpack_file", "dequantize_model", "read_artifact", "ArtifactError"]
