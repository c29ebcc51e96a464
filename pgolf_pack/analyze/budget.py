"""The cap check: artifact bytes + the decode code that ships with it, the margin, what it buys.

The decoder ``export-decoder`` generates for the artifact is counted as the file it writes. Code
the user names is counted the way the records ship it: Python sources are minified and put in a
self-extracting exec wrapper of the compressed source (raw LZMA2, or brotli), both by the one
minifier of :mod:`pgolf_pack.ship.minify` (annotations kept for user code). Each file counts the
smaller of its raw bytes and its best wrapper. The minifier renames nothing and keeps asserts, so
its figures are an upper bound on what the records' ``pyminify`` would give.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import CAP_BYTES
from ..errors import PgolfError
from ..ship.minify import minify, unwrap, wrappers
from .size import SizeReport

_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d+)\.")
_SIGMAS_RE = re.compile(r" [0-9.]+σ")


# --- code bytes ------------------------------------------------------------------------------------


@dataclass
class CodeCost:
    path: str
    raw_bytes: int
    minified_bytes: int | None = None
    lzma_bytes: int | None = None
    brotli_bytes: int | None = None

    @property
    def counted(self) -> tuple[int, str]:
        options = [(self.raw_bytes, "raw")]
        if self.lzma_bytes is not None:
            options.append((self.lzma_bytes, "minified+lzma wrapper"))
        if self.brotli_bytes is not None:
            options.append((self.brotli_bytes, "minified+brotli wrapper"))
        return min(options, key=lambda o: o[0])

    def to_dict(self) -> dict:
        n, how = self.counted
        return {**self.__dict__, "counted_bytes": n, "counted_as": how}


def expand_code_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given; directories become their ``*.py`` files (no caches), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
        elif p.is_file():
            out.append(p)
        else:
            raise PgolfError(f"code file not found: {p}")
    if not out:
        raise PgolfError("no code files found in the given --code paths")
    return out


def code_cost(path: str | os.PathLike) -> CodeCost:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PgolfError(f"cannot read code file {path}: {e.strerror}") from None
    cost = CodeCost(str(path), len(data))
    if path.suffix != ".py":
        return cost
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise PgolfError(f"code file {path} is not UTF-8 text") from None
    small = minify(text, keep_annotations=True)
    cost.minified_bytes = len(small.encode())
    for method, w in wrappers(small).items():
        if unwrap(w) != small:  # never count a wrapper that would not run
            raise PgolfError(f"internal error: the {method} wrapper of {path} does not decode")
        setattr(cost, f"{method}_bytes", len(w))
    return cost


# --- the verdict -----------------------------------------------------------------------------------


@dataclass
class MarginUse:
    layers: int  # layers found in the artifact
    layer_params: float  # mean params per layer
    layer_bytes: float  # mean measured bytes per layer, incl. its share of the manifest
    layer_scheme: str
    extra_layers: int  # whole layers the margin pays for (0 when over)
    matrix_bits_per_param: float  # bytes/param of the quantized matrices, in bits
    params_for_margin: int  # |margin| expressed in parameters at that rate


def decoder_cost(blob: bytes) -> CodeCost:
    """The decoder ``export-decoder`` writes for this artifact, counted as the file it writes
    (minified, in its self-extracting wrapper)."""
    from ..ship.exporter import export_decoder

    s = export_decoder(blob).sizes()
    return CodeCost("pgp_decode.py (export-decoder)", s["raw"], s["minified"], **{f"{s['compressor']}_bytes": s["wrapped"]})


@dataclass
class BudgetReport:
    artifact_bytes: int
    code: list[CodeCost]
    cap: int = CAP_BYTES
    use: MarginUse | None = None
    source: str = ""
    decoder: CodeCost | None = None  # the generated decoder of the artifact

    @property
    def code_bytes(self) -> int:
        return sum(c.counted[0] for c in self.code)

    @property
    def decoder_bytes(self) -> int:
        return 0 if self.decoder is None else self.decoder.counted[0]

    @property
    def total_bytes(self) -> int:
        return self.artifact_bytes + self.decoder_bytes + self.code_bytes

    @property
    def margin(self) -> int:
        return self.cap - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    @property
    def verdict(self) -> str:
        return f"fits, margin {self.margin:,} bytes" if self.fits else f"over by {-self.margin:,} bytes"

    def buys(self) -> list[str]:
        """Plain-language lines on what the margin buys (or what must go)."""
        u = self.use
        if u is None:
            return []
        lines = []
        m = abs(self.margin)
        if u.layers:
            shape = f"+1 layer of this shape ({u.layer_params:,.0f} params, {u.layer_scheme}) ≈ {u.layer_bytes:,.0f} bytes"
            if self.fits:
                lines.append(f"{shape}; the margin pays for {u.extra_layers} more layer(s)"
                             f" (mean of the {u.layers} measured layers)")
            else:
                lines.append(f"the excess is {m / u.layer_bytes:.0%} of one layer ({u.layer_bytes:,.0f} bytes each,"
                             f" mean of {u.layers}); dropping one layer saves about that much")
        if u.matrix_bits_per_param > 0:
            what = "more parameters" if self.fits else "parameters to remove (or store at fewer bits)"
            lines.append(f"at the quantized matrices' {u.matrix_bits_per_param:.3f} bits/param, {m:,} bytes ≈ "
                         f"{u.params_for_margin:,} {what}")
        return lines

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "artifact_bytes": self.artifact_bytes,
            "decoder": None if self.decoder is None else self.decoder.to_dict(),
            "decoder_bytes": self.decoder_bytes,
            "code": [c.to_dict() for c in self.code],
            "code_bytes": self.code_bytes,
            "total_bytes": self.total_bytes,
            "cap": self.cap,
            "margin": self.margin,
            "fits": self.fits,
            "verdict": self.verdict,
            "margin_use": None if self.use is None else self.use.__dict__,
            "buys": self.buys(),
        }


def margin_use(rep: SizeReport, margin: int) -> MarginUse:
    """Price a layer and a parameter from the measured bytes of the existing layers."""
    per_layer: dict[int, list] = {}
    for r in rep.rows:
        m = _LAYER_RE.search(r.name)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append(r)
    manifest_per_tensor = rep.header_bytes / max(len(rep.rows), 1)
    if per_layer:
        layer_bytes = sum(sum(r.bytes for r in rows) + manifest_per_tensor * len(rows)
                          for rows in per_layer.values()) / len(per_layer)
        layer_params = sum(sum(r.params for r in rows) for rows in per_layer.values()) / len(per_layer)
        # Searched clip widths differ per tensor; the family (method, bits) is what names the scheme.
        schemes = {_SIGMAS_RE.sub("", r.scheme) for rows in per_layer.values() for r in rows if r.symbol_bytes > 0}
        scheme = schemes.pop() if len(schemes) == 1 else ("the current mix" if schemes else "float")
    else:
        layer_bytes, layer_params, scheme = 0.0, 0.0, ""
    quant = [r for r in rep.rows if r.symbol_bytes > 0]
    qbytes, qparams = sum(r.bytes for r in quant), sum(r.params for r in quant)
    bpp = 8.0 * qbytes / qparams if qparams else 0.0
    return MarginUse(
        layers=len(per_layer),
        layer_params=layer_params,
        layer_bytes=layer_bytes,
        layer_scheme=scheme,
        extra_layers=int(margin // layer_bytes) if margin > 0 and layer_bytes > 0 else 0,
        matrix_bits_per_param=bpp,
        params_for_margin=int(abs(margin) * 8 / bpp) if bpp > 0 else 0,
    )


def budget_report(rep: SizeReport, code_paths: list[str | os.PathLike], cap: int = CAP_BYTES,
                  blob: bytes | None = None) -> BudgetReport:
    """``blob``: the artifact itself, whose generated decoder is then counted too."""
    if cap <= 0:
        raise PgolfError(f"--cap must be positive, got {cap}")
    costs = [code_cost(p) for p in expand_code_paths(code_paths)] if code_paths else []
    out = BudgetReport(rep.total_bytes, costs, cap, None, rep.source, decoder_cost(blob) if blob is not None else None)
    out.use = margin_use(rep, out.margin)
    return out
