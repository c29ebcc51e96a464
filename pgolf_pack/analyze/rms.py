"""Does a matrix's RMS predict how well its quantized symbols compress?

For every quantizable 2-D tensor: the RMS of its float weights, and its **compression ratio** =
packed bytes of its symbol stream / numel, i.e. compressed bytes per int-k code (codes are stored
one byte each, so this is compressed/raw of the code bytes; scales are reported apart). Each tensor
is packed alone (grouping ``tensor``) so its bytes are its own. Linear fits of ratio on RMS and on
log RMS, with R², plus the shape statistics that per-row scaling leaves in play (kurtosis, spread
of the row stds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from ..checkpoint import DEFAULT_MIN_NUMEL, check_finite, is_quantizable, to_float32
from ..errors import PgolfError
from ..pack.packer import pack_model
from ..pipeline import quantize_tensors, scheme_label
from ..recipe import Recipe, recipe_from_dict
from .size import attribute_stream_bytes, symbol_entropy_bits


@dataclass
class Fit:
    """y ≈ intercept + slope·x, least squares."""

    slope: float
    intercept: float
    r2: float
    n: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(x, dtype=np.float64)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def linear_fit(x, y) -> Fit:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of one length")
    if x.size < 2:
        raise PgolfError(f"a linear fit needs at least 2 points, got {x.size}")
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx) if sxx > 0 else 0.0
    intercept = float(ym - slope * xm)
    ss_tot = float(((y - ym) ** 2).sum())
    ss_res = float(((y - (intercept + slope * x)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return Fit(slope, intercept, r2, int(x.size))


def excess_kurtosis(w: np.ndarray) -> float:
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    d = w - w.mean()
    v = float((d * d).mean())
    return float((d**4).mean() / (v * v) - 3.0) if v > 0 else 0.0


@dataclass
class RmsRow:
    name: str
    shape: tuple
    rms: float
    ratio: float  # packed symbol bytes / numel
    entropy_ratio: float  # order-0 entropy of the symbols / 8
    side_bytes: int
    symbol_bytes: int
    kurtosis: float  # excess kurtosis of all weights
    row_std_cv: float  # std / mean of the per-row stds
    scheme: str

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class RmsReport:
    rows: list[RmsRow]
    fit_rms: Fit
    fit_log_rms: Fit
    other_fits: dict[str, Fit]
    scheme: str
    codec: str
    outliers: list[str] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict:
        return {
            "ratio_definition": "packed bytes of the tensor's symbols / numel (bytes per 1-byte code), tensor packed alone",
            "scheme": self.scheme,
            "codec": self.codec,
            "fit_ratio_vs_rms": self.fit_rms.to_dict(),
            "fit_ratio_vs_log_rms": self.fit_log_rms.to_dict(),
            "other_fits": {k: f.to_dict() for k, f in self.other_fits.items()},
            "outliers": self.outliers,
            "plot": self.plot,
            "tensors": [r.to_dict() for r in self.rows],
        }


def rms_analysis(
    tensors: Mapping[str, torch.Tensor],
    recipe: Recipe,
    codec: str = "auto-fast",
    n_outliers: int = 3,
    on_tensor: Callable[[str], None] | None = None,
) -> RmsReport:
    """Quantize every quantizable 2-D tensor with ``recipe``, pack each alone, fit ratio on RMS."""
    check_finite(tensors)
    mats = {k: t for k, t in tensors.items() if is_quantizable(t, recipe.min_numel)}
    if len(mats) < 3:
        raise PgolfError(f"RMS analysis needs at least 3 quantizable 2-D tensors, found {len(mats)}"
                         f" (min_numel {recipe.min_numel})")
    qm = quantize_tensors(mats, recipe, None, on_tensor)
    res = pack_model(qm, codec=codec, grouping="tensor")
    per, _ = attribute_stream_bytes(res.blob, res.manifest)
    rows = []
    for qt in qm.tensors:
        w = to_float32(mats[qt.name]).astype(np.float64)
        kinds = {s: v.kind for s, v in qt.streams.items()}
        sym = sum(b for s, b in per[qt.name].items() if kinds[s] == "symbols")
        side = sum(b for s, b in per[qt.name].items() if kinds[s] != "symbols")
        row_std = w.std(axis=1)
        h = symbol_entropy_bits(qt) or 0.0
        rows.append(RmsRow(qt.name, tuple(w.shape), float(np.sqrt((w * w).mean())), sym / qt.numel,
                           h / 8.0 / qt.numel, side, sym, excess_kurtosis(w),
                           float(row_std.std() / row_std.mean()) if row_std.mean() > 0 else 0.0, scheme_label(qt)))
    rms = np.array([r.rms for r in rows])
    ratio = np.array([r.ratio for r in rows])
    if np.any(rms <= 0):
        zero = rows[int(np.argmin(rms))].name
        raise PgolfError(f"tensor {zero} is all zeros: its log RMS is undefined")
    fit = linear_fit(rms, ratio)
    resid = np.abs(ratio - fit.predict(rms))
    outliers = [rows[i].name for i in np.argsort(-resid, kind="stable")[: max(0, n_outliers)]]
    others = {
        "kurtosis": linear_fit([r.kurtosis for r in rows], ratio),
        "log1p_kurtosis": linear_fit([np.log1p(max(r.kurtosis, -0.999)) for r in rows], ratio),
        "row_std_cv": linear_fit([r.row_std_cv for r in rows], ratio),
        "entropy_ratio": linear_fit([r.entropy_ratio for r in rows], ratio),
    }
    codecs = sorted({g["codec"] for g in res.manifest["groups"] if g["kind"] == "symbols"})
    return RmsReport(rows, fit, linear_fit(np.log(rms), ratio), others, describe_spec(recipe.default),
                     f"{codec} (chose {'+'.join(codecs)})", outliers)


def describe_spec(spec: Mapping) -> str:
    label = f"{spec.get('method', 'rtn')} int{spec.get('bits', 6)} {spec.get('clip', 'sdclip')}"
    if spec.get("clip", "sdclip") == "sdclip":
        label += f" {spec['sigmas']:g}σ" if "sigmas" in spec else " (width searched per tensor)"
    return label


def plot_rms(rep: RmsReport, path: str | os.PathLike, width_px: int = 1200, height_px: int = 500, dpi: int = 100) -> None:
    """Scatter of ratio vs RMS and vs log RMS with the fit lines; outliers labelled. PNG, exact size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write

    rms = np.array([r.rms for r in rep.rows])
    ratio = np.array([r.ratio for r in rep.rows])
    fig, axes = plt.subplots(1, 2, figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    try:
        for ax, fit, logx in ((axes[0], rep.fit_rms, False), (axes[1], rep.fit_log_rms, True)):
            x = np.log(rms) if logx else rms
            ax.scatter(rms, ratio, s=14, color="tab:blue", alpha=0.8)
            xs = np.linspace(x.min(), x.max(), 100)
            ax.plot(np.exp(xs) if logx else xs, fit.predict(xs), color="tab:red", lw=1.2,
                    label=f"fit R² = {fit.r2:.3f}")
            if logx:
                ax.set_xscale("log")
            for r in rep.rows:
                if r.name in rep.outliers:
                    ax.annotate(r.name, (r.rms, r.ratio), fontsize=7, xytext=(4, 4), textcoords="offset points")
            ax.set_xlabel("RMS of the float weights" + (" (log scale)" if logx else ""))
            ax.set_ylabel("packed symbol bytes / numel")
            ax.set_title(f"ratio vs {'log ' if logx else ''}RMS", fontsize=10)
            ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{rep.scheme}, codec {rep.codec}, {len(rep.rows)} tensors packed alone", fontsize=10)
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    rep.plot = str(path)


def rms_recipe(bits: int = 6, clip: str = "sdclip", sigmas: float | None = 12.85,
               min_numel: int = DEFAULT_MIN_NUMEL) -> Recipe:
    """One RTN scheme for every matrix; ``sigmas`` fixes the SDClip width (None: searched)."""
    default: dict = {"method": "rtn", "bits": bits, "clip": clip}
    if sigmas is not None and clip == "sdclip":
        default["sigmas"] = float(sigmas)
    return recipe_from_dict({"default": default, "min_numel": min_numel}, "options")
