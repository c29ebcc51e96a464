"""Checks every command runs on its options before any work: ranges of counts and widths, and the
input files an output must never overwrite."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..errors import PgolfError


def at_least(flag: str, value: Optional[int], lo: int = 1) -> None:
    if value is not None and value < lo:
        raise PgolfError(f"{flag} must be an integer >= {lo}, got {value}")


def positive(flag: str, value: Optional[float], what: str = "a positive number") -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise PgolfError(f"{flag} must be {what}, got {value}")


def non_negative(flag: str, value: Optional[float]) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise PgolfError(f"{flag} must be a number >= 0, got {value}")


def shard_inputs(tokens: Optional[str]) -> list[Path]:
    """Every file a token glob reads (an output must be none of them)."""
    if tokens is None:
        return []
    from ..calib.shards import shard_paths

    return shard_paths(tokens)


def model_inputs(model: Optional[str]) -> list[Path]:
    """The Python file behind --model FILE.py[:FACTORY], if any."""
    if model is None:
        return []
    from ..calib.adapter import ModelSpec

    return [ModelSpec.parse(model).path]
