"""Rate–distortion curves: artifact bytes against post-roundtrip BPB, pipeline by pipeline.

Pipelines (each point is quantize → pack → unpack → dequantize → BPB, so every number is what a
user would get from the artifact):

* ``record``  – GPTQ int-k with SDClip at the PR #1855 widths (attn int6 13σ, MLP int6 11.5σ,
  embedding int7 14σ; the widths scaled by a knob), per-group lrzip (``codec="lrzip"``; another
  codec can stand in where lrzip is missing or too slow);
* ``gptq``    – the same symbols with our coder (``codec="auto-fast"``);
* ``ecsq``    – entropy-coded scalar quantization in the GPTQ sweep, steps from one λ;
* ``rdoq``    – ECSQ with rate-aware rounding;
* ``trellis`` – 4-state dependent (trellis-coded) quantization.

The record widths are swept by a multiplier, the rate–distortion methods by λ around the value
whose predicted size matches the record point. ``compare`` reads the curves at the reference
pipeline's point: BPB at its bytes and bytes at its BPB (log-linear interpolation between points).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import PgolfError
from ..pack.packer import pack_model, unpack_model
from ..quant.allocate import RDConfig, _initial_lambda, prepare_model, proxy_error, quantize_model_rd
from ..recipe import Recipe, recipe_from_dict

PIPELINES = ("record", "gptq", "ecsq", "rdoq", "trellis")
RD_METHOD = {"ecsq": "ecsq", "rdoq": "rdoq", "trellis": "trellis"}
# PR #1855's SDClip widths (σ multiples) and bits per tensor class.
RECORD_SIGMAS = {"attn": 13.0, "mlp": 11.5, "embed": 14.0}


def record_recipe(width: float = 1.0) -> Recipe:
    """The #1855 recipe (GPTQ, SDClip) with every clip width multiplied by ``width``."""
    s = RECORD_SIGMAS
    return recipe_from_dict({
        "default": {"method": "gptq", "bits": 6, "clip": "sdclip", "sigmas": 12.85 * width},
        "rule": [
            {"match": "blocks.*.attn.*", "sigmas": s["attn"] * width},
            {"match": "blocks.*.mlp.*", "sigmas": s["mlp"] * width},
            {"match": "tok_emb.weight", "bits": 7, "sigmas": s["embed"] * width},
        ],
    }, "record recipe")


@dataclass
class RDPoint:
    pipeline: str
    knob: float  # record/gptq: clip-width multiplier; others: λ
    bytes: int
    bpb: float | None
    loss: float | None
    proxy: float | None  # Σ trace(ΔW H ΔWᵀ) with count-normalised H (None without Hessians)
    encode_s: float  # quantize + pack (Hessian preparation included)
    decode_s: float  # unpack + dequantize

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RDReport:
    points: list[RDPoint]
    fp_bpb: float | None
    fp_loss: float | None
    eval_tokens: int
    settings: dict = field(default_factory=dict)
    plot: str | None = None

    def curve(self, pipeline: str) -> list[RDPoint]:
        return sorted((p for p in self.points if p.pipeline == pipeline), key=lambda p: p.bytes)

    def to_dict(self) -> dict:
        return {"fp_bpb": self.fp_bpb, "fp_loss": self.fp_loss, "eval_tokens": self.eval_tokens,
                "settings": self.settings, "points": [p.to_dict() for p in self.points],
                "compare": compare(self) if any(p.pipeline == "record" for p in self.points) else None,
                "plot": self.plot}


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y at x on the piecewise-linear curve (xs ascending); None outside the measured range."""
    if len(xs) == 0 or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def compare(rep: RDReport, ref: str = "record", knob: float = 1.0) -> dict:
    """Each pipeline read at the reference point: BPB at its bytes, bytes at its BPB, margins."""
    refs = [p for p in rep.points if p.pipeline == ref and math.isclose(p.knob, knob)]
    if not refs or refs[0].bpb is None:
        return {}
    r = refs[0]
    out = {"reference": r.to_dict()}
    for name in dict.fromkeys(p.pipeline for p in rep.points):
        if name == ref:
            continue
        c = [p for p in rep.curve(name) if p.bpb is not None]
        if not c:
            continue
        lb = [math.log(p.bytes) for p in c]
        bpb_at = _interp(lb, [p.bpb for p in c], math.log(r.bytes))
        by_bpb = sorted(c, key=lambda p: p.bpb)
        lb_at = _interp([p.bpb for p in by_bpb], [math.log(p.bytes) for p in by_bpb], r.bpb)
        bytes_at = None if lb_at is None else int(round(math.exp(lb_at)))
        out[name] = {"bpb_at_ref_bytes": bpb_at,
                     "bpb_margin": None if bpb_at is None else r.bpb - bpb_at,
                     "bytes_at_ref_bpb": bytes_at,
                     "bytes_margin": None if bytes_at is None else r.bytes - bytes_at,
                     "bytes_margin_pct": None if bytes_at is None else 100.0 * (r.bytes - bytes_at) / r.bytes}
    return out


def _evaluate(loaded, state: Mapping[str, torch.Tensor], tokens, tokenizer, max_seqs: int | None, seq_len: int) -> dict:
    from ..calib.bpb import evaluate_bpb

    loaded.load_weights(state)
    return evaluate_bpb(loaded, tokens, tokenizer, seq_len=seq_len, max_seqs=max_seqs)


def _roundtrip(blob: bytes) -> tuple[dict[str, torch.Tensor], float]:
    from ..verify import dequantize_model

    t0 = time.perf_counter()
    qm, _ = unpack_model(blob)
    state = dequantize_model(qm)
    return state, time.perf_counter() - t0


def rd_curves(
    tensors: Mapping[str, torch.Tensor],
    hessians: Mapping[str, np.ndarray],
    counts: Mapping[str, int] | None,
    tokens: np.ndarray | None,
    tokenizer: str | os.PathLike | None,
    pipelines: Sequence[str] = PIPELINES,
    points: int = 3,
    max_seqs: int | None = None,
    seq_len: int = 1024,
    widths: Sequence[float] | None = None,
    lambdas: Sequence[float] | None = None,
    lambda_span: float = 4.0,
    cfg: RDConfig | None = None,
    sensitivity: Mapping[str, float] | None = None,
    codec: str = "entropy",
    on_point: Callable[[RDPoint], None] | None = None,
    eval_float: bool = True,
    record_codec: str = "lrzip",
    model=None,
    device: str = "cpu",
) -> RDReport:
    """Measure every pipeline at ``points`` settings. Without ``tokens`` BPB is left out (bytes and
    the Hessian proxy only). ``lambdas`` fixes the λ grid; else it spans ``lambda_span`` (ratio of
    largest to smallest) around the λ predicted to match the record point's bytes. BPB runs the
    adapter's model: ``model`` is a :class:`~pgolf_pack.calib.adapter.ModelSpec` (None: the
    reference GPT), built once on ``device``; each decoded artifact is loaded into it strictly."""
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise PgolfError(f"unknown pipeline {unknown[0]!r}; choose from {', '.join(PIPELINES)}")
    if points < 1:
        raise PgolfError(f"points must be >= 1, got {points}")
    if (tokens is None) != (tokenizer is None):
        raise PgolfError("BPB needs both --tokens and --tokenizer")
    from ..pipeline import quantize_tensors

    base_cfg = cfg or RDConfig()
    evaluate = tokens is not None
    loaded = None
    if evaluate:
        from ..calib.adapter import build_model

        loaded = build_model(tensors, model, device)
    fp = _evaluate(loaded, tensors, tokens, tokenizer, max_seqs, seq_len) if evaluate and eval_float else None
    out: list[RDPoint] = []

    def add(p: RDPoint) -> None:
        out.append(p)
        if on_point:
            on_point(p)

    last: list = [None, None]  # (state, evaluation) of the previous point

    def finish(pipeline: str, knob: float, blob: bytes, enc: float, proxy: float | None) -> None:
        state, dec = _roundtrip(blob)
        prev_state, prev_ev = last
        if evaluate and prev_ev is not None and _same_state(state, prev_state):
            ev = prev_ev  # record and gptq decode to identical weights: scoring once is enough
        else:
            ev = _evaluate(loaded, state, tokens, tokenizer, max_seqs, seq_len) if evaluate else None
        last[:] = [state, ev]
        add(RDPoint(pipeline, float(knob), len(blob), ev and ev["bpb"], ev and ev["loss"], proxy, enc, dec))

    # Count-normalised Hessians for the proxy of the int-k pipelines.
    norm = {k: np.asarray(v, dtype=np.float64) / max(int((counts or {}).get(k, 1)), 1) for k, v in hessians.items()}
    ref_bytes = None
    if "record" in pipelines or "gptq" in pipelines:
        ws = list(widths) if widths is not None else ([1.0] if points == 1 else list(np.geomspace(0.8, 1.25, points)))
        if 1.0 not in ws:
            ws.append(1.0)
        for wdt in sorted(ws):
            t0 = time.perf_counter()
            qm = quantize_tensors(tensors, record_recipe(wdt), hessians, device=device)
            tq = time.perf_counter() - t0
            proxy = _intk_proxy(tensors, qm, norm)
            for name, c in (("record", record_codec), ("gptq", "auto-fast")):
                if name not in pipelines:
                    continue
                t0 = time.perf_counter()
                blob = pack_model(qm, codec=c).blob
                finish(name, wdt, blob, tq + time.perf_counter() - t0, proxy)
                if math.isclose(wdt, 1.0) and (ref_bytes is None or name == "record"):
                    ref_bytes = len(blob)
    for name in pipelines:
        if name not in RD_METHOD:
            continue
        c = replace(base_cfg, method=RD_METHOD[name])
        t0 = time.perf_counter()
        mp = prepare_model(tensors, hessians, c, counts, sensitivity, device=device)
        t_prep = time.perf_counter() - t0
        if lambdas is not None:
            grid = list(lambdas)
        else:
            center = _initial_lambda(mp, ref_bytes or int(sum(t.numel() for t in tensors.values()) * 0.41))
            grid = [center] if points == 1 else list(center * np.geomspace(lambda_span ** -0.5, lambda_span ** 0.5, points))
        for lam in grid:
            t0 = time.perf_counter()
            qm = quantize_model_rd(mp, lam)
            blob = pack_model(qm, codec=codec).blob
            enc = t_prep + time.perf_counter() - t0
            proxy = float(sum(proxy_error(mp, qm).values())) if mp.tensors and mp.tensors[0].h is not None else None
            finish(name, lam, blob, enc, proxy)
    settings = {"pipelines": list(pipelines), "points": points, "max_seqs": max_seqs, "seq_len": seq_len,
                "codec": codec, "record_codec": record_codec, "rd": base_cfg.to_dict(), "sensitivity": dict(sensitivity or {})}
    n_tok = fp["tokens"] if fp else (_scored_tokens(tokens, max_seqs, seq_len) if evaluate else 0)
    return RDReport(out, fp and fp["bpb"], fp and fp["loss"], n_tok, settings)


def _scored_tokens(tokens, max_seqs: int | None, seq_len: int) -> int:
    n = (int(np.asarray(tokens).size) - 1) // seq_len
    return (n if max_seqs is None else min(n, int(max_seqs))) * seq_len


def _same_state(a: Mapping[str, torch.Tensor] | None, b: Mapping[str, torch.Tensor] | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _intk_proxy(tensors, qm, norm) -> float | None:
    from ..checkpoint import to_float32
    from ..quant.base import dequantize_float32
    from ..quant.gptq import hessian_error

    total = 0.0
    for t in qm.tensors:
        if t.scheme == "float" or t.name not in norm:
            continue
        total += hessian_error(to_float32(tensors[t.name]), dequantize_float32(t), norm[t.name])
    return total


def plot_rd(rep: RDReport, path: str | os.PathLike, width_px: int = 1000, height_px: int = 600, dpi: int = 100) -> None:
    """Bytes (x) against BPB (y), one line per pipeline, the float model as a dashed line. PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write

    if not any(p.bpb is not None for p in rep.points):
        raise PgolfError("nothing to plot: no point has a BPB (give --tokens and --tokenizer)")
    fig, ax = plt.subplots(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    try:
        for name in dict.fromkeys(p.pipeline for p in rep.points):
            c = [p for p in rep.curve(name) if p.bpb is not None]
            ax.plot([p.bytes / 1e6 for p in c], [p.bpb for p in c], marker="o", ms=4, lw=1.3, label=name)
        if rep.fp_bpb is not None:
            ax.axhline(rep.fp_bpb, color="gray", ls="--", lw=1, label=f"float {rep.fp_bpb:.4f}")
        ax.set_xlabel("artifact bytes (MB)")
        ax.set_ylabel(f"BPB ({rep.eval_tokens:,} tokens, after the roundtrip)")
        ax.set_title("rate–distortion: bytes against BPB", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    rep.plot = str(path)
