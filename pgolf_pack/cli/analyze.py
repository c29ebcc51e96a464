"""analyze size | budget | rms."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .. import CAP_BYTES
from ..analyze.budget import budget_report
from ..analyze.rms import plot_rms, rms_analysis, rms_recipe
from ..analyze.size import SORT_KEYS, SPLITS, Packed, SizeReport, is_artifact, load_or_pack, size_report
from ..checkpoint import DEFAULT_MIN_NUMEL, load_checkpoint
from ..errors import PgolfError
from ..pack.packer import CODEC_CHOICES
from ..quant.rtn import CLIP_RULES
from ..recipe import Recipe, load_recipe, simple_recipe
from ..fileio import check_outputs
from .app import JsonOpt, analyze_app, console, fmt_int, handle_errors, print_json, progress
from .checks import positive

_CODEC_HELP = f"codec when packing a checkpoint: {' | '.join(CODEC_CHOICES)}"


def _recipe(recipe: Optional[Path], method: str, bits: int, embed_bits: Optional[int], clip: str,
            sigmas: Optional[float], embed_sigmas: Optional[float], min_numel: int, fp16: bool) -> Recipe:
    if clip not in CLIP_RULES:
        raise PgolfError(f"unknown clip rule {clip!r}; choose one of {', '.join(CLIP_RULES)}")
    if recipe:
        return load_recipe(recipe)
    return simple_recipe(method, bits, embed_bits, clip, sigmas, embed_sigmas, min_numel, "fp16" if fp16 else "float")


def _hessians(path: Optional[Path]):
    if path is None:
        return None
    from ..calib.hessian import load_hessians

    return load_hessians(path)[0]


def _packed(inp: Path, rec: Recipe, codec: str, group_by: str, hessians: Optional[Path], show: bool) -> Packed:
    if not inp.is_file():
        raise PgolfError(f"input not found: {inp}")
    if is_artifact(inp):
        return load_or_pack(inp, rec, codec, group_by)
    n = len(load_checkpoint(inp))
    with progress(show, n, "quantize") as step:
        return load_or_pack(inp, rec, codec, group_by, _hessians(hessians), step)


def _size(inp: Path, rec: Recipe, codec: str, group_by: str, hessians: Optional[Path], show: bool,
          split: str = "entropy") -> SizeReport:
    p = _packed(inp, rec, codec, group_by, hessians, show)
    return size_report(p.blob, p.manifest, p.qm, p.originals, p.source, split)


def render_size(rep: SizeReport, sort: str, top: Optional[int]) -> None:
    how = "by order-0 entropy" if rep.split == "entropy" else "by raw size"
    t = Table(title=f"{rep.source}: {fmt_int(rep.total_bytes)} bytes", caption=f"symbol group bytes split over tensors {how}")
    for col, just in [("tensor", "left"), ("params", "right"), ("scheme", "left"), ("H0 bits/param", "right"),
                      ("symbol bytes", "right"), ("side bytes", "right"), ("bytes", "right"), ("share", "right"),
                      ("bits/param", "right")]:
        t.add_column(col, justify=just)
    rows = rep.sorted_rows(sort)
    shown, rest = (rows[:top], rows[top:]) if top is not None and top < len(rows) else (rows, [])
    for r in shown:
        t.add_row(r.name, fmt_int(r.params), r.scheme, "" if r.entropy_bpp is None else f"{r.entropy_bpp:.3f}",
                  fmt_int(r.symbol_bytes), fmt_int(r.side_bytes), fmt_int(r.bytes), f"{r.share:.2%}",
                  f"{r.bits_per_param:.3f}")
    if rest:
        b = sum(r.bytes for r in rest)
        t.add_row(f"({len(rest)} more tensors)", fmt_int(sum(r.params for r in rest)), "", "",
                  fmt_int(sum(r.symbol_bytes for r in rest)), fmt_int(sum(r.side_bytes for r in rest)), fmt_int(b),
                  f"{b / max(rep.total_bytes, 1):.2%}", "")
    t.add_row("(header + manifest)", "", "", "", "", "", fmt_int(rep.header_bytes),
              f"{rep.header_bytes / max(rep.total_bytes, 1):.2%}", "")
    t.add_section()
    t.add_row("total", fmt_int(rep.total_params), "", "", fmt_int(sum(r.symbol_bytes for r in rows)),
              fmt_int(sum(r.side_bytes for r in rows)), fmt_int(rep.total_bytes), "100.00%",
              f"{8 * rep.total_bytes / max(rep.total_params, 1):.3f}")
    console.print(t)


RecipeOpt = typer.Option(None, help="TOML/JSON recipe (checkpoint input only)")
MethodOpt = typer.Option("rtn", help="rtn | gptq | e8p (checkpoint input only)")
BitsOpt = typer.Option(6, min=2, max=8, help="bits for quantized matrices (checkpoint input only)")
EmbedBitsOpt = typer.Option(None, min=2, max=8, help="bits for embedding tensors (*emb*)")
ClipOpt = typer.Option("sdclip", help="absmax | sdclip | mse")
SigmasOpt = typer.Option(None, help="fixed SDClip width in row std (searched if omitted)")
EmbedSigmasOpt = typer.Option(None, help="fixed SDClip width for embeddings")
MinNumelOpt = typer.Option(DEFAULT_MIN_NUMEL, help="2-D tensors smaller than this stay in float")
Fp16Opt = typer.Option(False, help="store non-quantized float tensors as float16")
HessiansOpt = typer.Option(None, help="Hessian file (needed for --method gptq)")
CodecOpt = typer.Option("auto-fast", help=_CODEC_HELP)
GroupByOpt = typer.Option("role", help="role | tensor | single (checkpoint input only)")


@analyze_app.command("size")
@handle_errors
def size_cmd(
    input: Path = typer.Argument(..., help="artifact, or a checkpoint to quantize and pack in memory"),
    recipe: Optional[Path] = RecipeOpt,
    method: str = MethodOpt,
    bits: int = BitsOpt,
    embed_bits: Optional[int] = EmbedBitsOpt,
    clip: str = ClipOpt,
    sigmas: Optional[float] = SigmasOpt,
    embed_sigmas: Optional[float] = EmbedSigmasOpt,
    min_numel: int = MinNumelOpt,
    fp16_passthrough: bool = Fp16Opt,
    hessians: Optional[Path] = HessiansOpt,
    codec: str = CodecOpt,
    group_by: str = GroupByOpt,
    sort: str = typer.Option("bytes", help=f"row order: {' | '.join(SORT_KEYS)} (order = checkpoint order)"),
    split: str = typer.Option("entropy", help="split a symbol group's bytes over its tensors by order-0 entropy "
                              "(entropy) or by raw size like the quantize report (raw)"),
    top: Optional[int] = typer.Option(None, min=1, help="show only the N first rows (the rest summed in one row)"),
    csv: Optional[Path] = typer.Option(None, "--csv", help="also write the full table as CSV"),
    json_out: bool = JsonOpt,
) -> None:
    """Per-tensor bytes: symbols (order-0 entropy and packed), scales/side data, share of the file.

    Rows plus the header+manifest line add up to the artifact size exactly.
    """
    check_outputs([csv], [input, recipe, hessians])
    if sort not in SORT_KEYS:
        raise PgolfError(f"unknown sort key {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    if split not in SPLITS:
        raise PgolfError(f"unknown split {split!r}; choose entropy or raw")
    rec = _recipe(recipe, method, bits, embed_bits, clip, sigmas, embed_sigmas, min_numel, fp16_passthrough)
    rep = _size(input, rec, codec, group_by, hessians, not json_out, split)
    if csv is not None:
        rep.write_csv(csv, sort)
    if json_out:
        print_json(rep.to_dict())
    else:
        render_size(rep, sort, top)
        if csv is not None:
            console.print(f"wrote {csv}")


@analyze_app.command("budget")
@handle_errors
def budget_cmd(
    input: Path = typer.Argument(..., help="artifact, or a checkpoint to quantize and pack in memory"),
    cap: int = typer.Option(CAP_BYTES, help="byte cap for artifact + code"),
    code: Optional[List[Path]] = typer.Option(None, "--code", help="decode code that ships (file or directory of .py; repeatable)"),
    recipe: Optional[Path] = RecipeOpt,
    method: str = MethodOpt,
    bits: int = BitsOpt,
    embed_bits: Optional[int] = EmbedBitsOpt,
    clip: str = ClipOpt,
    sigmas: Optional[float] = SigmasOpt,
    embed_sigmas: Optional[float] = EmbedSigmasOpt,
    min_numel: int = MinNumelOpt,
    fp16_passthrough: bool = Fp16Opt,
    hessians: Optional[Path] = HessiansOpt,
    codec: str = CodecOpt,
    group_by: str = GroupByOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Artifact + shipped code against the cap, the margin, and what the margin buys.

    The artifact's own decoder (what export-decoder writes: minified, in its exec wrapper) is counted automatically.
    Other Python code (--code) counts as the smaller of its raw bytes and its minified, lzma- or brotli-compressed exec wrapper (the way records ship code).

    Exit code 0 when it fits, 1 when over the cap (or on an error).
    """
    rec = _recipe(recipe, method, bits, embed_bits, clip, sigmas, embed_sigmas, min_numel, fp16_passthrough)
    p = _packed(input, rec, codec, group_by, hessians, not json_out)
    rep = size_report(p.blob, p.manifest, p.qm, p.originals, p.source)
    b = budget_report(rep, list(code or []), cap, p.blob)
    if json_out:
        print_json(b.to_dict())
    else:
        t = Table(title=f"budget: {b.source}")
        for col in ("item", "raw", "minified", "lzma wrapper", "brotli wrapper", "counted"):
            t.add_column(col, justify="left" if col == "item" else "right")
        t.add_row("artifact", fmt_int(b.artifact_bytes), "", "", "", fmt_int(b.artifact_bytes))
        opt = lambda v: "" if v is None else fmt_int(v)  # noqa: E731
        for c in [b.decoder] if b.decoder else []:
            t.add_row(f"decoder {c.path}", fmt_int(c.raw_bytes), opt(c.minified_bytes), opt(c.lzma_bytes),
                      opt(c.brotli_bytes), f"{fmt_int(c.counted[0])} ({c.counted[1]})")
        for c in b.code:
            n, how = c.counted
            t.add_row(f"code {c.path}", fmt_int(c.raw_bytes), opt(c.minified_bytes), opt(c.lzma_bytes),
                      opt(c.brotli_bytes), f"{fmt_int(n)} ({how})")
        t.add_section()
        t.add_row("total", "", "", "", "", fmt_int(b.total_bytes))
        t.add_row("cap", "", "", "", "", fmt_int(b.cap))
        console.print(t)
        if not b.code:
            console.print("note: no --code given; only the generated decoder is counted, not your train_gpt.py")
        for line in b.buys():
            console.print(f"  {line}")
        console.print(f"{'FITS' if b.fits else 'OVER'}: {b.verdict}")
    if not b.fits:
        raise typer.Exit(1)


@analyze_app.command("rms")
@handle_errors
def rms_cmd(
    checkpoint: Path = typer.Argument(..., help="safetensors or torch.save state dict"),
    bits: int = typer.Option(6, min=2, max=8, help="bits of the int-k scheme"),
    clip: str = typer.Option("sdclip", help="absmax | sdclip | mse"),
    sigmas: float = typer.Option(12.85, help="fixed SDClip width in row std (the records' int6 width)"),
    search_clip: bool = typer.Option(False, help="search the SDClip width per tensor instead of --sigmas"),
    min_numel: int = MinNumelOpt,
    codec: str = CodecOpt,
    plot: Optional[Path] = typer.Option(None, help="write a PNG scatter with the fits"),
    json_out: bool = JsonOpt,
) -> None:
    """Per-matrix RMS vs compression ratio (packed symbol bytes / numel, each matrix packed alone).

    Fits ratio on RMS and on log RMS and reports R² and the worst-fitting matrices.
    """
    check_outputs([plot], [checkpoint])
    if clip not in CLIP_RULES:
        raise PgolfError(f"unknown clip rule {clip!r}; choose one of {', '.join(CLIP_RULES)}")
    positive("--sigmas", sigmas, "a positive clip width in row std")
    tensors = load_checkpoint(checkpoint)
    rec = rms_recipe(bits, clip, None if search_clip else sigmas, min_numel)
    with progress(not json_out, len(tensors), "quantize") as step:
        rep = rms_analysis(tensors, rec, codec, on_tensor=step)
    if plot is not None:
        plot_rms(rep, plot)
    if json_out:
        print_json(rep.to_dict())
        return
    t = Table(title=f"{checkpoint}: {rep.scheme}, codec {rep.codec}")
    for col in ("tensor", "shape", "RMS", "ratio", "H0/8", "excess kurtosis", "row-std CV", "residual"):
        t.add_column(col, justify="left" if col in ("tensor", "shape") else "right")
    for r in rep.rows:
        res = r.ratio - float(rep.fit_rms.predict(r.rms))
        t.add_row(r.name + (" *" if r.name in rep.outliers else ""), "×".join(map(str, r.shape)), f"{r.rms:.5f}",
                  f"{r.ratio:.4f}", f"{r.entropy_ratio:.4f}", f"{r.kurtosis:.2f}", f"{r.row_std_cv:.3f}", f"{res:+.4f}")
    console.print(t)
    console.print("ratio = packed symbol bytes / numel (each matrix packed alone; scales not included)")
    console.print(f"ratio vs RMS:     ratio ≈ {rep.fit_rms.intercept:.4f} + {rep.fit_rms.slope:.4f}·RMS, "
                  f"R² = {rep.fit_rms.r2:.4f} (n = {rep.fit_rms.n})")
    console.print(f"ratio vs log RMS: ratio ≈ {rep.fit_log_rms.intercept:.4f} + {rep.fit_log_rms.slope:.4f}·ln RMS, "
                  f"R² = {rep.fit_log_rms.r2:.4f}")
    for name, f in rep.other_fits.items():
        console.print(f"ratio vs {name}: R² = {f.r2:.4f}")
    console.print(f"largest residuals (*): {', '.join(rep.outliers)}")
    if plot is not None:
        console.print(f"wrote {plot}")
