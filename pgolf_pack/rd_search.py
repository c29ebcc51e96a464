"""Searches above the quantizers and the packer: the byte predictor of an entropy-coded model and
the λ search that fits a rate–distortion quantization into a byte budget: searched on predicted
bytes (one quantize per λ, no pack), settled and guaranteed on real packed bytes.

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


def rate_proxy(qm: QuantizedModel, grouping: str = "role") -> float:
    """A cheap size signal (bytes) that tracks the packed artifact across λ: every symbol
    group's per-column order-0 entropy plus the side groups' raw bytes.

    Not a prediction by itself (it knows no codec); :func:`fit_budget` scales it by the measured
    ratio of real packed bytes to it, which drifts only slowly with λ (a fraction of a percent
    per factor two on the bundled example), so it costs a histogram where a model fit would
    cost seconds."""
    bits, side = 0.0, 0
    for g in build_groups(qm, grouping):
        if g.kind != "symbols":
            side += g.raw_bytes
            continue
        for a in g.arrays:
            m = _as_2d(a)
            if m.size == 0:
                continue
            k = m.astype(np.int64) - int(m.min())
            n = int(k.max()) + 1
            cols = m.shape[1]
            h = np.bincount((k + (np.arange(cols, dtype=np.int64) * n)[None, :]).ravel(),
                            minlength=cols * n).reshape(cols, n).astype(np.float64)
            p = h / h.sum(axis=1, keepdims=True)
            nz = h > 0
            bits -= float((h[nz] * np.log2(p[nz])).sum())
    return bits / 8.0 + side


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
    history: list[BudgetPoint] = field(default_factory=list)  # the real packs, in order
    probes: int = 0  # quantizations made (each λ once), real packs included

    @property
    def bytes(self) -> int:
        return len(self.pack.blob)


# The ratio real/proxy may drift at most this much per unit of ln λ when extrapolated beyond the
# packed points (measured drift on the bundled example: about 0.017).
_MAX_RATIO_SLOPE = 0.05
# With no packed point the proxy itself is the prediction: real/proxy measured 0.77-1.0 (the
# bundled example at λ 1e-9..1e-5, the bench checkpoint 0.983-0.988 near its record size), so the
# first real pack lands at or a little under the aim, and its ratio then corrects the rest.
_PRIOR_RATIO = 1.0
# The entropy models a search pins after its first pack: these code any symbol range (escapes);
# ``ref`` has a range limit, so its groups keep choosing.
_PINNABLE = ("hist", "col", "row", "rc")
# With one packed point the drift is unknown; the ratio grows as λ falls (the coders' fixed
# side information weighs more, and the proxy misses context gains less): this prior slope per
# unit of ln λ is the bundled example's, and the next real pack replaces it with a measured one.
_PRIOR_RATIO_SLOPE = -0.015


class _Corrected:
    """Real bytes predicted from the proxy: proxy × the ratio real/proxy of the packed points,
    interpolated piecewise linearly in ln λ (exact at every packed point)."""

    def __init__(self) -> None:
        self.pts: list[tuple[float, float]] = []  # (ln λ, real/proxy), sorted

    def add(self, lam: float, real: float, proxy: float) -> None:
        self.pts = sorted([*self.pts, (math.log(lam), real / max(proxy, 1e-9))])

    def ratio(self, lam: float) -> float:
        x, pts = math.log(lam), self.pts
        if not pts:
            return _PRIOR_RATIO
        if len(pts) == 1:
            return pts[0][1] + _PRIOR_RATIO_SLOPE * (x - pts[0][0])
        if x <= pts[0][0]:
            a, b = pts[0], pts[1]
        elif x >= pts[-1][0]:
            a, b = pts[-2], pts[-1]
        else:
            i = next(i for i in range(1, len(pts)) if pts[i][0] >= x)
            a, b = pts[i - 1], pts[i]
        sl = (b[1] - a[1]) / (b[0] - a[0]) if b[0] != a[0] else 0.0
        if not a[0] <= x <= b[0]:
            sl = float(np.clip(sl, -_MAX_RATIO_SLOPE, _MAX_RATIO_SLOPE))
        ref = a if abs(x - a[0]) <= abs(x - b[0]) else b
        return ref[1] + sl * (x - ref[0])


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
    max_probes: int = 48,
) -> BudgetResult:
    """Largest-quality λ whose real packed artifact (+ ``extra_bytes``, e.g. code) fits ``budget``.

    λ is searched on predicted bytes: each probe quantizes once (every λ at most once) and
    scores :func:`rate_proxy` scaled by the real/proxy ratio of the packs made so far (the proxy
    alone before the first); only the λ the prediction picks is packed for real, and each real
    pack sharpens the ratio. Usually two real packs land within ``rel_tol`` of the budget. With
    the entropy codec, the models the first pack chose are pinned for the later ones (each
    group then fits one model, not every candidate). Only really packed points
    are ever returned, so the artifact never exceeds the budget. Stops after ``max_iter`` real
    packs. Raises PgolfError, saying by how many bytes, when even the coarsest λ tried does not
    fit (the quantize API refuses a non-positive budget before any work).
    """
    history: list[BudgetPoint] = []
    quantized: dict[float, tuple[QuantizedModel, float]] = {}
    packed: dict[float, PackResult] = {}
    corr = _Corrected()
    n = max(sum(t.numel for t in mp.tensors), 1)
    # Bytes fall about linearly in log λ (at high rate each factor 4 in λ is one bit per weight).
    per_log2 = max(0.5 * n / 8.0, 1.0)

    def quantize(lam: float) -> tuple[QuantizedModel, float]:
        if lam not in quantized:
            qm = quantize_model_rd(mp, lam)
            quantized[lam] = (qm, rate_proxy(qm, grouping) + extra_bytes)
        return quantized[lam]

    def predict(lam: float) -> float:
        return quantize(lam)[1] * corr.ratio(lam)

    pins: dict[str, dict] = {}

    def pack(lam: float) -> int:
        t0 = time.perf_counter()
        qm, proxy = quantize(lam)
        res = pack_model(qm, codec=codec, grouping=grouping, choices=pins)
        if codec == "entropy" and not pins:
            pins.update({g["name"]: {"codec": "entropy", "model": g["model"]} for g in res.manifest["groups"]
                         if g["codec"] == "entropy" and g.get("model") in _PINNABLE})
        packed[lam] = res
        p = BudgetPoint(lam, len(res.blob) + extra_bytes, time.perf_counter() - t0)
        history.append(p)
        corr.add(lam, p.bytes, proxy)
        if on_point:
            on_point(p)
        return p.bytes

    def search(target: float, start: float) -> tuple[float, bool]:
        """A λ whose predicted bytes are within a tenth of the tolerance of ``target``: secant
        steps in log2 λ, then bisection-guarded secant once the crossing is bracketed. Also
        says whether the prediction stopped falling above the target (the artifact's floor)."""
        x, f = math.log2(start), predict(start)
        lo = hi = None  # (log2 λ, prediction): the finest above / the coarsest at or below the target
        slope = per_log2
        for _ in range(max_probes):
            if abs(f - target) <= 0.1 * rel_tol * budget:
                return 2.0**x, False  # within a tenth of the tolerance of the aim: under the budget
            if f > target:
                lo = (x, f) if lo is None or x > lo[0] else lo
            else:
                hi = (x, f) if hi is None or x < hi[0] else hi
            if lo is not None and hi is not None:
                if hi[0] - lo[0] < 1e-4:
                    break
                frac = (lo[1] - target) / (lo[1] - hi[1]) if lo[1] != hi[1] else 0.5
                nx = lo[0] + float(np.clip(frac, 0.05, 0.95)) * (hi[0] - lo[0])
            else:
                nx = x + float(np.clip((f - target) / slope, -4.0, 4.0))
            nf = predict(2.0**nx)
            if hi is None and nx - x >= 1.0 and f - nf <= 1e-4 * f:
                return 2.0**nx, True
            if nf != f and nx != x:
                slope = max((f - nf) / (nx - x), 1e-3 * per_log2)
            x, f = nx, nf
        if f > target and hi is not None:
            x = hi[0]  # not converged: never hand back a λ predicted over the target when one under is known
        return 2.0**x, False

    lam = lam0 if lam0 is not None else _initial_lambda(mp, budget - extra_bytes)
    aim = budget * (1.0 - 0.5 * rel_tol)
    pack(search(aim, lam)[0])
    while len(history) < max_iter:
        best = max((p.bytes for p in history if p.bytes <= budget), default=None)
        if best is not None and budget - best <= rel_tol * budget:
            break
        nearest = min(history, key=lambda p: abs(p.bytes - aim)).lam
        nxt, floor = search(aim, nearest)
        if nxt in packed:
            if best is not None or floor:
                break  # the prediction cannot do better than a point already packed
            nxt = max(packed) * 2.0  # nothing fits yet and the prediction is stuck: coarser
        b = pack(nxt)
        if floor and best is None and b > budget:
            break  # coarser λ no longer shrinks the artifact, and its floor is over the budget
    feasible = [p for p in history if p.bytes <= budget]
    if not feasible:
        low = min(p.bytes for p in history)
        raise PgolfError(f"budget {budget:,} bytes cannot be met: the smallest artifact tried is "
                         f"{low:,} bytes ({low - budget:,} over)")
    pick = max(feasible, key=lambda p: (p.bytes, -p.lam))
    return BudgetResult(quantized[pick.lam][0], packed[pick.lam], pick.lam, history, len(quantized))
