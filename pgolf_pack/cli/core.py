"""quantize, unpack, verify-roundtrip, inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import CAP_BYTES
from ..checkpoint import DEFAULT_MIN_NUMEL, load_checkpoint
from ..pack.container import read_container
from ..pack.packer import CODEC_CHOICES
from ..pipeline import PackReport, quantize_file
from ..recipe import load_recipe, simple_recipe
from ..verify import read_artifact, unpack_file, verify_roundtrip
from .app import JsonOpt, app, console, fmt_int, handle_errors, print_json, progress


def load_hessian_file(path: Optional[Path]):
    if path is None:
        return None
    from ..calib.hessian import load_hessians

    return load_hessians(path)[0]


def render_pack_report(rep: PackReport, title: str) -> None:
    t = Table(title=title)
    for col, just in [("tensor", "left"), ("params", "right"), ("scheme", "left"), ("bytes", "right"),
                      ("bits/param", "right"), ("rel. error", "right")]:
        t.add_column(col, justify=just)
    for r in rep.rows:
        err = "" if r.rel_error != r.rel_error else f"{r.rel_error:.4f}"
        t.add_row(r.name, fmt_int(r.params), r.scheme, fmt_int(r.bytes), f"{r.bits_per_param:.3f}", err)
    t.add_row("(header + manifest)", "", "", fmt_int(rep.header_bytes), "", "")
    total_params = sum(r.params for r in rep.rows)
    t.add_section()
    t.add_row("total", fmt_int(total_params), "", fmt_int(rep.total_bytes), f"{8 * rep.total_bytes / max(total_params, 1):.3f}", "")
    console.print(t)
    verdict = "fits" if rep.margin >= 0 else "OVER"
    console.print(f"artifact {fmt_int(rep.total_bytes)} bytes vs cap {fmt_int(rep.cap)}: {verdict}, margin "
                  f"{fmt_int(rep.margin)} bytes (code bytes not included; see `analyze budget`)")


@app.command()
@handle_errors
def quantize(
    checkpoint: Path = typer.Argument(..., help="safetensors or torch.save state dict"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact file to write"),
    method: str = typer.Option("rtn", help="rtn | gptq | e8p (a --recipe overrides)"),
    bits: int = typer.Option(6, min=2, max=8, help="bits for quantized matrices"),
    embed_bits: Optional[int] = typer.Option(None, min=2, max=8, help="bits for embedding tensors (*emb*)"),
    clip: str = typer.Option("sdclip", help="absmax | sdclip | mse"),
    sigmas: Optional[float] = typer.Option(None, help="fixed SDClip width in row std (searched if omitted)"),
    embed_sigmas: Optional[float] = typer.Option(None, help="fixed SDClip width for embeddings"),
    recipe: Optional[Path] = typer.Option(None, help="TOML/JSON recipe mapping tensor globs to schemes"),
    codec: str = typer.Option("auto", help=f"{' | '.join(CODEC_CHOICES)}"),
    group_by: str = typer.Option("role", help="role | tensor | single"),
    hessians: Optional[Path] = typer.Option(None, help="Hessian file from `calibrate` or the capture hooks"),
    min_numel: int = typer.Option(DEFAULT_MIN_NUMEL, help="2-D tensors smaller than this stay in float"),
    fp16_passthrough: bool = typer.Option(False, help="store non-quantized float tensors as float16"),
    json_out: bool = JsonOpt,
) -> None:
    """Quantize a checkpoint and pack it into one artifact; prints the per-tensor size table."""
    rec = load_recipe(recipe) if recipe else simple_recipe(
        method, bits, embed_bits, clip, sigmas, embed_sigmas, min_numel, "fp16" if fp16_passthrough else "float")
    H = load_hessian_file(hessians)
    n = len(load_checkpoint(checkpoint))
    with progress(not json_out, n, "quantize") as step:
        rep = quantize_file(checkpoint, output, rec, codec=codec, grouping=group_by, hessians=H, on_tensor=step)
    if json_out:
        print_json({"artifact": str(output), **rep.to_dict()})
    else:
        render_pack_report(rep, f"{output}")


@app.command()
@handle_errors
def unpack(
    artifact: Path = typer.Argument(...),
    output: Path = typer.Option(..., "-o", "--output", help="dequantized safetensors checkpoint to write"),
    json_out: bool = JsonOpt,
) -> None:
    """Decode an artifact into a dequantized safetensors checkpoint (original dtypes)."""
    state = unpack_file(artifact, output)
    if json_out:
        print_json({"output": str(output), "tensors": len(state)})
    else:
        console.print(f"wrote {output} ({len(state)} tensors)")


@app.command("verify-roundtrip")
@handle_errors
def verify_roundtrip_cmd(
    artifact: Path = typer.Argument(...),
    against: Optional[Path] = typer.Option(None, help="original checkpoint to measure the error against"),
    json_out: bool = JsonOpt,
) -> None:
    """Decode, check every group's checksums, re-pack byte-identically and report the error."""
    rep = verify_roundtrip(artifact, against)
    if json_out:
        print_json(rep.to_dict())
    else:
        if rep.tensors:
            t = Table(title=f"dequantization error vs {against}")
            for col in ("tensor", "shape", "rel. error", "max |err|"):
                t.add_column(col, justify="left" if col in ("tensor", "shape") else "right")
            for c in rep.tensors:
                t.add_row(c.name, "×".join(map(str, c.shape)), f"{c.rel_error:.5f}", f"{c.max_abs_error:.4g}")
            console.print(t)
        console.print(f"checksums: {'ok' if rep.checksums_ok else 'FAILED'} ({rep.groups} groups); "
                      f"re-pack byte-identical: {'yes' if rep.repack_identical else 'NO'}; "
                      f"decode+dequantize {rep.decode_seconds:.2f} s, re-pack {rep.repack_seconds:.2f} s")
    if not rep.ok:
        raise typer.Exit(1)


@app.command()
@handle_errors
def inspect(artifact: Path = typer.Argument(...), json_out: bool = JsonOpt) -> None:
    """Show an artifact's manifest: groups with codec and sizes, tensors with schemes."""
    blob = read_artifact(artifact)
    manifest, _ = read_container(blob)
    if json_out:
        print_json({"bytes": len(blob), **manifest})
        return
    t = Table(title=f"{artifact}: {fmt_int(len(blob))} bytes ({len(blob) / CAP_BYTES:.1%} of the cap)")
    for col in ("group", "codec", "layout", "raw", "packed", "ratio"):
        t.add_column(col, justify="right" if col in ("raw", "packed", "ratio") else "left")
    for g in manifest["groups"]:
        lay = g.get("layout")
        lay_s = ",".join(f"{k}={v}" for k, v in lay.items()) if lay else ("shuffle" if g.get("shuffle") else "")
        t.add_row(g["name"], g["codec"], lay_s, fmt_int(g["raw_bytes"]), fmt_int(g["length"]),
                  f"{g['length'] / max(g['raw_bytes'], 1):.3f}")
    console.print(t)
    t2 = Table(title="tensors")
    for col in ("tensor", "shape", "dtype", "scheme"):
        t2.add_column(col)
    from ..quant.base import QuantizedTensor
    from ..pipeline import scheme_label

    for x in manifest["tensors"]:
        qt = QuantizedTensor(x["name"], tuple(x["shape"]), x["dtype"], x["scheme"], x["params"])
        t2.add_row(x["name"], "×".join(map(str, x["shape"])), x["dtype"], scheme_label(qt))
    console.print(t2)
