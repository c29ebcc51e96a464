"""quantize, unpack, verify-roundtrip, inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import CAP_BYTES
from ..checkpoint import DEFAULT_MIN_NUMEL, load_checkpoint
from ..errors import PgolfError
from ..pack.container import read_container
from ..pack.packer import CODEC_CHOICES
from ..pipeline import PackReport, quantize_file
from ..recipe import load_recipe, simple_recipe
from ..verify import read_artifact, unpack_file, verify_roundtrip
from .app import JsonOpt, app, console, fmt_int, handle_errors, print_json, progress


def load_hessian_file(path: Optional[Path], with_counts: bool = False):
    if path is None:
        return (None, None) if with_counts else None
    from ..calib.hessian import load_hessians

    H, counts = load_hessians(path)
    return (H, counts) if with_counts else H


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
    method: str = typer.Option("rtn", help="rtn | gptq | e8p (a --recipe overrides) | ecsq | rdoq | trellis "
                                           "(rate–distortion: needs --budget or --lam)"),
    bits: int = typer.Option(6, min=2, max=8, help="bits for quantized matrices"),
    embed_bits: Optional[int] = typer.Option(None, min=2, max=8, help="bits for embedding tensors (*emb*)"),
    clip: str = typer.Option("sdclip", help="absmax | sdclip | mse"),
    sigmas: Optional[float] = typer.Option(None, help="fixed SDClip width in row std (searched if omitted)"),
    embed_sigmas: Optional[float] = typer.Option(None, help="fixed SDClip width for embeddings"),
    recipe: Optional[Path] = typer.Option(None, help="TOML/JSON recipe mapping tensor globs to schemes"),
    codec: Optional[str] = typer.Option(None, help=f"{' | '.join(CODEC_CHOICES)} (default: auto; entropy for "
                                                   "ecsq/rdoq/trellis, whose symbols it models)"),
    group_by: str = typer.Option("role", help="role | tensor | single"),
    hessians: Optional[Path] = typer.Option(None, help="Hessian file from `calibrate` or the capture hooks"),
    min_numel: int = typer.Option(DEFAULT_MIN_NUMEL, help="2-D tensors smaller than this stay in float"),
    fp16_passthrough: bool = typer.Option(False, help="store non-quantized float tensors as float16"),
    lqer_top_k: int = typer.Option(0, min=0, help="add LQER low-rank correction to the K most damaged tensors"),
    lqer_rank: int = typer.Option(4, min=1, help="LQER rank"),
    lqer_bits: int = typer.Option(4, min=2, max=8, help="LQER factor bits"),
    lqer_group: int = typer.Option(64, min=1, help="LQER factor quantization group size"),
    lqer_weighted: str = typer.Option("none", help="none | diag | chol: fit LQER in the Hessian norm (needs --hessians)"),
    row_bits: Optional[str] = typer.Option(None, help="per-row bit tiers for embeddings, e.g. '10%:8,rest:6'"),
    tokens: Optional[str] = typer.Option(None, help="TRAIN token shards: rank embedding rows by token frequency"),
    budget: Optional[int] = typer.Option(None, help="fit this many bytes: rtn/gptq choose bits per tensor (least predicted "
                                                    "loss); ecsq/rdoq/trellis search λ on real packed bytes"),
    save_recipe_to: Optional[Path] = typer.Option(None, "--save-recipe", help="with --budget: where to write the chosen recipe"),
    lam: Optional[float] = typer.Option(None, "--lam", help="ecsq/rdoq/trellis without --budget: λ, the loss per bit that "
                                                            "sets every matrix's step (larger = smaller artifact)"),
    sensitivity: Optional[Path] = typer.Option(None, help="JSON of tensor name or glob -> loss sensitivity multiplier "
                                                          "(`pgolf-pack sensitivity`), for ecsq/rdoq/trellis or --budget"),
    json_out: bool = JsonOpt,
) -> None:
    """Quantize a checkpoint and pack it into one artifact; prints the per-tensor size table."""
    from ..pipeline import LqerOptions
    from .quantize_rd import RD_METHODS, check_rd_options, quantize_rd

    rd = method in RD_METHODS
    check_rd_options(method, rd, lam, sensitivity, budget, {
        "--recipe": recipe is not None, "--embed-bits": embed_bits is not None, "--sigmas": sigmas is not None,
        "--embed-sigmas": embed_sigmas is not None, "--lqer-top-k": lqer_top_k > 0, "--lqer-weighted": lqer_weighted != "none",
        "--row-bits": bool(row_bits), "--tokens": bool(tokens), "--save-recipe": save_recipe_to is not None})
    if rd:
        quantize_rd(checkpoint, output, method, budget, lam, hessians, sensitivity, codec or "entropy", group_by, min_numel,
                    "fp16" if fp16_passthrough else "float", json_out)
        return
    codec = codec or "auto"
    rec = load_recipe(recipe) if recipe else simple_recipe(
        method, bits, embed_bits, clip, sigmas, embed_sigmas, min_numel, "fp16" if fp16_passthrough else "float")
    if row_bits:
        from ..recipe import EMBED_GLOB, recipe_from_dict

        rec = recipe_from_dict({**rec.to_dict(), "rule": [*rec.to_dict()["rule"], {"match": EMBED_GLOB, "row_bits": row_bits}]},
                               "options")
    if lqer_weighted not in ("none", "diag", "chol"):
        raise PgolfError(f"--lqer-weighted must be none, diag or chol, got {lqer_weighted!r}")
    lqer = LqerOptions(lqer_top_k, lqer_rank, lqer_bits, lqer_group, False if lqer_weighted == "none" else lqer_weighted)
    H, counts = load_hessian_file(hessians, with_counts=True)
    freq = None
    if tokens:
        from ..calib.shards import load_tokens
        from ..quant.mixed_rows import token_counts

        toks = load_tokens(tokens)
        freq = token_counts(toks, int(toks.max()) + 1)
    if budget is not None:
        _quantize_to_budget(checkpoint, output, rec, budget, method, codec, group_by, H, counts, save_recipe_to, json_out,
                            sensitivity)
        return
    n = len(load_checkpoint(checkpoint))
    with progress(not json_out, n, "quantize") as step:
        rep = quantize_file(checkpoint, output, rec, codec=codec, grouping=group_by, hessians=H, on_tensor=step,
                            lqer=lqer, token_freq=freq)
    if json_out:
        print_json({"artifact": str(output), **rep.to_dict()})
    else:
        render_pack_report(rep, f"{output}")


def _quantize_to_budget(checkpoint, output, rec, budget, method, codec, group_by, H, counts, save_to, json_out,
                        sensitivity=None) -> None:
    from ..analyze.optimize import default_candidates, optimize_plan, save_recipe
    from ..quant.allocate import load_sensitivity
    from ..fileio import atomic_write_bytes, check_not_input
    from ..pack.packer import unpack_model
    from ..pipeline import report

    check_not_input(output, checkpoint)
    tensors = load_checkpoint(checkpoint)
    with progress(not json_out, 1, "optimize") as step:
        plan_recipe, det = optimize_plan(tensors, budget, H, default_candidates(method=method), codec, hessian_counts=counts,
                                         base=rec, grouping=group_by, sensitivity=load_sensitivity(sensitivity))
        step("done")
    atomic_write_bytes(output, det.blob)
    rpath = save_to or output.with_name(output.name + ".recipe.toml")
    check_not_input(rpath, checkpoint)
    save_recipe(plan_recipe, rpath, comment=f"pgolf-pack quantize --budget {budget}: {det.actual_bytes} bytes")
    qm, manifest = unpack_model(det.blob)
    rep = report(det.blob, manifest, qm, tensors)
    if json_out:
        print_json({"artifact": str(output), "recipe": str(rpath), "optimizer": det.to_dict(), **rep.to_dict()})
        return
    render_pack_report(rep, f"{output} (budget {fmt_int(budget)})")
    console.print(f"optimizer: {fmt_int(det.actual_bytes)} bytes packed for a budget of {fmt_int(budget)} "
                  f"(margin {fmt_int(det.margin)}); plan saved to {rpath} — edit it and re-run with --recipe")


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
