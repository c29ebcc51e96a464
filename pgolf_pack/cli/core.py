"""quantize, unpack, verify-roundtrip, inspect."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import CAP_BYTES
from ..analyze.optimize import default_candidates
from ..api import RD_METHODS, BitBudgetPlan, RDConfig, RDPlan, RecipePlan, quantize_file
from ..checkpoint import DEFAULT_MIN_NUMEL
from ..errors import PgolfError
from ..fileio import check_not_input
from ..pack.container import read_container
from ..pack.packer import CODEC_CHOICES
from ..pipeline import LqerOptions
from ..quant.rtn import CLIP_RULES
from ..recipe import EMBED_GLOB, METHODS, load_recipe, recipe_from_dict, simple_recipe
from ..verify import read_artifact, unpack_file, verify_roundtrip
from .app import JsonOpt, app, console, fmt_int, handle_errors, print_json
from .checks import at_least, positive
from .render import StageProgress, render_quantize, warn

# Options that only some paths read. Each path lists what it reads; any other given option is
# refused with one line saying why, so no option is ever silently ignored.
# --device is read by every path; the API refuses a GPU for a plan with no torch sweep to run there.
_RD_READS = {"--method", "--codec", "--group-by", "--hessians", "--min-numel", "--fp16-passthrough", "--budget", "--lam",
             "--sensitivity", "--device"}
_BUDGET_READS = {"--method", "--clip", "--codec", "--group-by", "--hessians", "--min-numel", "--fp16-passthrough",
                 "--budget", "--save-recipe", "--sensitivity", "--device"}
_LQER_DETAIL = ("--lqer-rank", "--lqer-bits", "--lqer-group", "--lqer-weighted")
_SCHEME_FLAGS = ("--method", "--bits", "--embed-bits", "--clip", "--sigmas", "--embed-sigmas", "--min-numel",
                 "--fp16-passthrough")
_INT_SCHEME_FLAGS = ("--bits", "--embed-bits", "--clip", "--sigmas", "--embed-sigmas")


def check_values(method: str, clip: str, sigmas: Optional[float], embed_sigmas: Optional[float],
                 min_numel: Optional[int]) -> None:
    """Values named by their flag, before any path is chosen (a NaN width would zero every weight)."""
    known = tuple(dict.fromkeys((*METHODS, *RD_METHODS)))
    if method not in known:
        raise PgolfError(f"--method: unknown method {method!r}; choose one of {', '.join(known)}")
    if clip not in CLIP_RULES:
        raise PgolfError(f"--clip: unknown clip {clip!r}; choose one of {', '.join(CLIP_RULES)}")
    positive("--sigmas", sigmas, "a positive clip width in row std")
    positive("--embed-sigmas", embed_sigmas, "a positive clip width in row std")
    at_least("--min-numel", min_numel, 0)


def refuse_ignored(method: str, given: dict[str, bool], clip: str, recipe: bool, budget: bool, lqer_top_k: int) -> None:
    """Raise for the first given option the chosen path would not read (``given``: flag -> set)."""
    used = [f for f, on in given.items() if on]
    if method in RD_METHODS:
        for f in used:
            if f not in _RD_READS:
                raise PgolfError(f"{f} does not apply to --method {method}: one λ sets every matrix's step (use a recipe "
                                 "with method 'ecsq' or 'trellis' for per-tensor settings)")
        return
    if given["--lam"]:
        raise PgolfError(f"--lam applies only to --method {', '.join(RD_METHODS[:-1])} or {RD_METHODS[-1]}, not {method}")
    if given["--sensitivity"] and not budget:
        raise PgolfError(f"--sensitivity applies only to --method {', '.join(RD_METHODS)} or with --budget, not {method}")
    if budget:
        if method not in ("rtn", "gptq"):
            raise PgolfError(f"--budget with --method {method}: there are no bit widths to choose; budgets apply to "
                             f"rtn and gptq (bits per tensor) and to {', '.join(RD_METHODS)} (λ)")
        why = {"--bits": "the optimizer chooses the bits (int2..int8) per tensor",
               "--embed-bits": "the optimizer chooses the embedding's bits too",
               "--sigmas": "the optimizer searches each candidate's clip width",
               "--embed-sigmas": "the optimizer searches each candidate's clip width",
               "--recipe": "the optimizer writes the recipe (see --save-recipe); re-run it with --recipe alone",
               "--lqer-top-k": "LQER factors would add bytes the optimizer never measured",
               "--row-bits": "per-row tiers are not among the optimizer's candidates",
               "--tokens": "token frequencies only rank rows for --row-bits"}
        for f in used:
            if f not in _BUDGET_READS:
                raise PgolfError(f"{f} does not apply with --budget: {why.get(f, 'the optimizer does not read it')}")
        return
    if given["--save-recipe"]:
        raise PgolfError("--save-recipe applies only with --budget (the optimizer's plan); a recipe run has its recipe")
    if recipe:
        for f in _SCHEME_FLAGS:
            if given[f]:
                raise PgolfError(f"{f} does not apply with --recipe: the recipe sets every tensor's scheme (edit it instead)")
    elif method in ("e8p", "float", "fp16"):
        what = ("E8P codes every matrix at 2 bits/weight with its own scales" if method == "e8p"
                else "the tensors are stored unquantized")
        for f in (*_INT_SCHEME_FLAGS, "--row-bits"):
            if given[f]:
                raise PgolfError(f"{f} does not apply to --method {method}: {what}")
    if given["--embed-bits"] and given["--row-bits"]:
        raise PgolfError("--embed-bits does not apply with --row-bits: the row tiers set the embedding's bits")
    if clip != "sdclip":
        for f in ("--sigmas", "--embed-sigmas"):
            if given[f]:
                raise PgolfError(f"{f} applies only to --clip sdclip (a fixed width in row std), not {clip}")
    if lqer_top_k == 0:
        for f in _LQER_DETAIL:
            if given[f]:
                raise PgolfError(f"{f} applies only with --lqer-top-k K > 0 (the tensors that get LQER factors)")


@app.command()
@handle_errors
def quantize(
    checkpoint: Path = typer.Argument(..., help="safetensors or torch.save state dict"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact file to write"),
    method: Optional[str] = typer.Option(None, help="rtn (default) | gptq | e8p | ecsq | rdoq | trellis "
                                                    "(rate–distortion: needs --budget or --lam)"),
    bits: Optional[int] = typer.Option(None, min=2, max=8, help="bits for quantized matrices (default 6)"),
    embed_bits: Optional[int] = typer.Option(None, min=2, max=8, help="bits for embedding tensors (*emb*)"),
    clip: Optional[str] = typer.Option(None, help="absmax | sdclip (default) | mse"),
    sigmas: Optional[float] = typer.Option(None, help="fixed SDClip width in row std (searched if omitted)"),
    embed_sigmas: Optional[float] = typer.Option(None, help="fixed SDClip width for embeddings"),
    recipe: Optional[Path] = typer.Option(None, help="TOML/JSON recipe mapping tensor globs to schemes"),
    codec: Optional[str] = typer.Option(None, help=f"{' | '.join(CODEC_CHOICES)} (default: auto; entropy for "
                                                   "ecsq/rdoq/trellis, whose symbols it models)"),
    group_by: str = typer.Option("role", help="role | tensor | single"),
    hessians: Optional[Path] = typer.Option(None, help="Hessian file from `calibrate` or the capture hooks"),
    min_numel: Optional[int] = typer.Option(None, help=f"2-D tensors smaller than this stay in float (default {DEFAULT_MIN_NUMEL})"),
    fp16_passthrough: bool = typer.Option(False, help="store non-quantized float tensors as float16"),
    lqer_top_k: int = typer.Option(0, min=0, help="add LQER low-rank correction to the K most damaged tensors"),
    lqer_rank: Optional[int] = typer.Option(None, min=1, help="LQER rank (default 4)"),
    lqer_bits: Optional[int] = typer.Option(None, min=2, max=8, help="LQER factor bits (default 4)"),
    lqer_group: Optional[int] = typer.Option(None, min=1, help="LQER factor quantization group size (default 64)"),
    lqer_weighted: Optional[str] = typer.Option(None, help="none (default) | diag | chol: fit LQER in the Hessian norm "
                                                           "(needs --hessians)"),
    row_bits: Optional[str] = typer.Option(None, help="per-row bit tiers for embeddings, e.g. '10%:8,rest:6'"),
    tokens: Optional[str] = typer.Option(None, help="TRAIN token shards: rank embedding rows by token frequency (with row bits)"),
    budget: Optional[int] = typer.Option(None, help="fit this many bytes: rtn/gptq choose bits per tensor (least predicted "
                                                    "loss); ecsq/rdoq/trellis search λ on real packed bytes"),
    save_recipe_to: Optional[Path] = typer.Option(None, "--save-recipe", help="with --budget: where to write the chosen recipe"),
    lam: Optional[float] = typer.Option(None, "--lam", help="ecsq/rdoq/trellis without --budget: λ, the loss per bit that "
                                                            "sets every matrix's step (larger = smaller artifact)"),
    sensitivity: Optional[Path] = typer.Option(None, help="JSON of tensor name or glob -> loss sensitivity multiplier "
                                                          "(`pgolf-pack sensitivity`), for ecsq/rdoq/trellis or --budget"),
    device: Optional[str] = typer.Option(None, help="cpu (default) | cuda[:N]: where the GPTQ/ECSQ/RDOQ/trellis sweeps run "
                                                    "(rtn, e8p and float are numpy work and refuse a GPU)"),
    json_out: bool = JsonOpt,
) -> None:
    """Quantize a checkpoint and pack it into one artifact; prints the per-tensor size table."""
    given = {"--method": method is not None, "--bits": bits is not None, "--embed-bits": embed_bits is not None,
             "--clip": clip is not None, "--sigmas": sigmas is not None, "--embed-sigmas": embed_sigmas is not None,
             "--recipe": recipe is not None, "--codec": codec is not None, "--group-by": True,
             "--hessians": hessians is not None, "--min-numel": min_numel is not None,
             "--fp16-passthrough": fp16_passthrough, "--lqer-top-k": lqer_top_k > 0, "--lqer-rank": lqer_rank is not None,
             "--lqer-bits": lqer_bits is not None, "--lqer-group": lqer_group is not None,
             "--lqer-weighted": lqer_weighted is not None, "--row-bits": row_bits is not None,
             "--tokens": tokens is not None, "--budget": budget is not None, "--save-recipe": save_recipe_to is not None,
             "--lam": lam is not None, "--sensitivity": sensitivity is not None, "--device": device is not None}
    method, clip = method or "rtn", clip or "sdclip"
    check_values(method, clip, sigmas, embed_sigmas, min_numel)
    refuse_ignored(method, given, clip, recipe is not None, budget is not None, lqer_top_k)
    passthrough = "fp16" if fp16_passthrough else "float"
    min_numel = DEFAULT_MIN_NUMEL if min_numel is None else min_numel
    if method in RD_METHODS:
        plan = RDPlan(budget=budget, lam=lam, sensitivity=sensitivity, codec=codec or "entropy", grouping=group_by,
                      config=RDConfig(method=method, min_numel=min_numel, passthrough=passthrough))
    elif budget is not None:
        plan = BitBudgetPlan(budget=budget, candidates=tuple(default_candidates(method=method, clip=clip)),
                             sensitivity=sensitivity, min_numel=min_numel, passthrough=passthrough, codec=codec or "auto",
                             grouping=group_by, recipe_out=save_recipe_to)
    else:
        rec = recipe if recipe is not None else simple_recipe(
            method, 6 if bits is None else bits, embed_bits, clip, sigmas, embed_sigmas, min_numel, passthrough)
        if row_bits:
            if recipe is not None:
                check_not_input(output, recipe)  # the API checks the inputs it reads; this one is read here
                rec = load_recipe(recipe)
            tiers = recipe_from_dict({"rule": [{"match": EMBED_GLOB, "row_bits": row_bits}]}, "--row-bits").rules
            rec = dataclasses.replace(rec, rules=[*rec.rules, *tiers])
        weighted = lqer_weighted or "none"
        if weighted not in ("none", "diag", "chol"):
            raise PgolfError(f"--lqer-weighted must be none, diag or chol, got {weighted!r}")
        lqer = LqerOptions(lqer_top_k, 4 if lqer_rank is None else lqer_rank, 4 if lqer_bits is None else lqer_bits,
                           64 if lqer_group is None else lqer_group, False if weighted == "none" else weighted)
        plan = RecipePlan(recipe=rec, lqer=lqer, token_freq=tokens, codec=codec or "auto", grouping=group_by)
    with StageProgress(not json_out) as prog:
        res = quantize_file(checkpoint, output, plan, hessians=hessians, progress=prog, warn=warn, device=device or "cpu")
    if json_out:
        print_json(res.to_dict())
    else:
        render_quantize(res)


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
