"""Searches above the quantizers and the packer: the byte predictor of an entropy-coded model and
the λ search that fits a rate–distortion quantization into a byte budget on real packed bytes.

quant/ quantizes at a given λ (:mod:`pgolf_pack.quant.allocate`) and pack/ packs; only this layer
uses both, so quant/ never imports the packer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import PgolfError
from .pack.container import write_container
from .coding.entropy import estimate_bits
from .pack.packer import PackResult, _as_2d, build_groups, build_manifest, encode_group, pack_model
from .quant.allocate import ModelPrep, _initial_lambda, quantize_model_rd
from .quant.base import QuantizedModel


def predict_bytes(qm: QuantizedModel, grouping: str = "role") -> int:
    """Predicted artifact bytes when packed with ``codec="entropy"``: every symbol group's
    entropy-coder estimate (exact side information, ideal ANS rate, rounded up to whole 32-bit
    words as the coder writes them), the side groups coded as the packer would, and the
    container with its manifest."""
    groups = build_groups(qm, grouping)
    lengths, descs = [], []
    for g in groups:
        if g.kind == "symbols":
            lengths.append(int(math.ceil(estimate_bits([_as_2d(a) for a in g.arrays], g.lo, g.hi) / 8.0)))
            descs.append({"codec": "entropy"})
        else:
            payload, desc = encode_group(g, "entropy")
            lengths.append(len(payload))
            descs.append(desc)
    return len(_container_like(qm, groups, grouping, lengths, descs))


def _container_like(qm: QuantizedModel, groups, grouping: str, lengths: list[int], descs: list[dict]) -> bytes:
    """A container with the manifest ``pack_model`` would write and zero payloads of the given
    lengths: its size differs from the real one only by how well brotli compresses the CRCs."""
    return write_container(build_manifest(qm, groups, grouping, descs), [bytes(n) for n in lengths])


@dataclass
class BudgetPoint:
    lam: float
    bytes: int
    seconds: float


@dataclass
class BudgetResult:
    qm: QuantizedModel
    pack: PackResult
    lam: float
    history: list[BudgetPoint] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return len(self.pack.blob)


def fit_budget(
    mp: ModelPrep,
    budget: int,
    codec: str = "auto-fast",
    lam0: float | None = None,
    max_iter: int = 12,
    rel_tol: float = 0.002,
    extra_bytes: int = 0,
    on_point: Callable[[BudgetPoint], None] | None = None,
    grouping: str = "role",
) -> BudgetResult:
    """Largest-quality λ whose real packed artifact (+ ``extra_bytes``, e.g. code) fits ``budget``.

    Bisection in log λ on real ``pack_model`` bytes: bytes fall as λ grows. Stops when the best
    feasible point is within ``rel_tol`` of the budget or after ``max_iter`` packs. Raises
    PgolfError, saying by how many bytes, when even the coarsest λ tried does not fit (the quantize
    API refuses a non-positive budget before any work; here it would only fail that way).
    """
    history: list[BudgetPoint] = []
    cache: dict[float, tuple[QuantizedModel, PackResult]] = {}

    def slope() -> float:
        """Bytes per unit of log2 λ: the secant of the last two probes once there are two."""
        if len(history) >= 2:
            a, c = history[-2], history[-1]
            if a.lam != c.lam and a.bytes != c.bytes:
                return max((a.bytes - c.bytes) / math.log2(c.lam / a.lam), 1.0)
        return per_log2

    def size(lam: float) -> int:
        t0 = time.perf_counter()
        qm = quantize_model_rd(mp, lam)
        res = pack_model(qm, codec=codec, grouping=grouping)
        cache[lam] = (qm, res)
        p = BudgetPoint(lam, len(res.blob) + extra_bytes, time.perf_counter() - t0)
        history.append(p)
        if on_point:
            on_point(p)
        return p.bytes

    lam = lam0 if lam0 is not None else _initial_lambda(mp, budget - extra_bytes)
    # Bytes fall about linearly in log λ (at high rate each factor 4 in λ is one bit per weight),
    # so steps are sized from that slope, and later from the measured secant, not halved blindly.
    per_log2 = max(0.5 * sum(t.numel for t in mp.tensors) / 8.0, 1.0)  # bytes per unit of log2 λ
    aim = budget * (1.0 - 0.5 * rel_tol)
    lo = hi = None  # lo: infeasible λ (too many bytes); hi: feasible λ
    b = size(lam)
    if b <= budget:
        hi, b_hi = lam, b
        while lo is None and len(history) < max_iter:
            if budget - b_hi <= rel_tol * budget:
                break
            nxt = hi / 2.0 ** float(np.clip(1.25 * (aim - b_hi) / slope(), 0.02, 4.0))
            bn = size(nxt)
            if bn <= budget:
                hi, b_hi = nxt, bn
            else:
                lo, b_lo = nxt, bn
    else:
        lo, b_lo = lam, b
        while hi is None:
            if len(history) >= max_iter + 8:
                raise PgolfError(f"budget {budget:,} bytes cannot be met: the smallest artifact tried is "
                                 f"{min(p.bytes for p in history):,} bytes ({min(p.bytes for p in history) - budget:,} over)")
            nxt = lo * 2.0 ** float(np.clip(1.25 * (b_lo - aim) / slope(), 0.02, 2.0))
            bn = size(nxt)
            if bn <= budget:
                hi, b_hi = nxt, bn
            else:
                lo, b_lo = nxt, bn
    while lo is not None and len(history) < max_iter:
        best = max((p.bytes for p in history if p.bytes <= budget), default=0)
        if budget - best <= rel_tol * budget:
            break
        # Secant in log λ between the bracket ends, kept inside its middle 80% so it always shrinks.
        x_lo, x_hi = math.log(lo), math.log(hi)
        frac = (b_lo - aim) / (b_lo - b_hi) if b_lo != b_hi else 0.5
        mid = math.exp(x_lo + float(np.clip(frac, 0.1, 0.9)) * (x_hi - x_lo))
        bm = size(mid)
        if bm <= budget:
            hi, b_hi = mid, bm
        else:
            lo, b_lo = mid, bm
    feasible = [p for p in history if p.bytes <= budget]
    pick = max(feasible, key=lambda p: (p.bytes, -p.lam))
    qm, res = cache[pick.lam]
    return BudgetResult(qm, res, pick.lam, history)
