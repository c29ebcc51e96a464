"""The one check of a ``--device`` value, shared by every command that computes with torch
(calibrate, sensitivity, eval, analyze rd, quantize): run before any work, so a typo or a
missing GPU costs one line instead of a traceback after minutes of loading."""

from __future__ import annotations

import re

import torch

from .errors import PgolfError

_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def device_name(device) -> str:
    """``device`` as a string when it is spelled "cpu", "cuda" or "cuda:N"; PgolfError otherwise."""
    d = str(device)
    if not _DEVICE.fullmatch(d):
        raise PgolfError(f"--device must be cpu or cuda[:N], got {d!r}")
    return d


def check_device(device: str) -> str:
    """``device`` ("cpu", "cuda" or "cuda:N") when this machine has it; PgolfError otherwise."""
    d = device_name(device)
    if d == "cpu":
        return d
    if not torch.cuda.is_available():
        raise PgolfError(f"--device {d} requested but no CUDA device is available")
    index, count = int(d.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise PgolfError(f"--device {d}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return d
