"""analyze rd: rate–distortion curves (artifact bytes against BPB) of the quantization pipelines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import PgolfError
from ..fileio import check_outputs
from .app import JsonOpt, analyze_app, console, err_console, fmt_int, handle_errors, print_json
from .checks import model_inputs, non_negative, positive, shard_inputs
from .model_opts import DeviceOpt, ModelClassOpt, ModelOpt


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PgolfError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise PgolfError(f"{what} must be positive numbers, got {text!r}")
    return vals


def _more_or_less(margin: float, fmt: str, good: str, bad: str, unit: str = "") -> str:
    return f"{abs(margin):{fmt}}{unit} {good if margin >= 0 else bad}"


@analyze_app.command("rd")
@handle_errors
def rd_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint (state dict) of the model"),
    hessians: Path = typer.Option(..., help="Hessian file from `pgolf-pack calibrate`"),
    tokens: Optional[str] = typer.Option(None, help="glob of token shards to score BPB on (e.g. the val shard)"),
    tokenizer: Optional[Path] = typer.Option(None, help="sentencepiece model of the tokens"),
    pipelines: str = typer.Option(",".join(("record", "gptq", "ecsq", "rdoq", "trellis")),
                                  help="comma list of record | gptq | ecsq | rdoq | trellis"),
    points: int = typer.Option(3, min=1, help="settings per pipeline"),
    widths: Optional[str] = typer.Option(None, help="record/gptq clip-width multipliers, e.g. 0.9,1,1.1"),
    lambdas: Optional[str] = typer.Option(None, help="λ values for ecsq/rdoq/trellis (default: around the record's size)"),
    lambda_span: float = typer.Option(4.0, help="largest / smallest λ of the default grid"),
    row_mode: str = typer.Option("flat", help="flat | std: one step per matrix, or per-row std multiples"),
    col_beta: float = typer.Option(1.0, help="per-column steps from GPTQ's column weights (0 = off, 1 = equal slope)"),
    rdoq_gain: float = typer.Option(1.0, help="RDOQ / trellis λ relative to the allocation λ"),
    sensitivity: Optional[Path] = typer.Option(None, help="JSON: tensor name or glob -> loss sensitivity multiplier"),
    codec: str = typer.Option("entropy", help="codec for ecsq/rdoq/trellis artifacts"),
    record_codec: str = typer.Option("lrzip", help="codec of the record pipeline (lrzip as in the records)"),
    max_seqs: Optional[int] = typer.Option(None, min=1, help="score only this many sequences (faster, noisier)"),
    seq_len: int = typer.Option(1024, min=1),
    score_float: bool = typer.Option(True, "--float/--no-float", help="also score the float model"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG of bytes against BPB"),
    device: str = DeviceOpt,
    model: Optional[str] = ModelOpt,
    model_class: Optional[str] = ModelClassOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Bytes against post-roundtrip BPB for record-style GPTQ + lrzip, GPTQ + our coder, ECSQ,
    ECSQ + RDOQ and trellis quantization; margins read at the record point."""
    from ..analyze.rd import PIPELINES, compare, plot_rd, rd_curves
    from ..calib.adapter import ModelSpec, check_device
    from ..calib.hessian import load_hessians
    from ..calib.shards import load_tokens
    from ..checkpoint import load_checkpoint
    from ..quant.allocate import RDConfig, load_sensitivity

    names = [p.strip() for p in pipelines.split(",") if p.strip()]
    if not names:
        raise PgolfError(f"--pipelines names none; choose from {', '.join(PIPELINES)}")
    bad = [p for p in names if p not in PIPELINES]
    if bad:
        raise PgolfError(f"unknown pipeline {bad[0]!r}; choose from {', '.join(PIPELINES)}")
    if (tokens is None) != (tokenizer is None):
        raise PgolfError("BPB needs both --tokens and --tokenizer")
    if plot is not None and tokens is None:
        raise PgolfError("--plot needs BPB: give --tokens and --tokenizer")
    spec = ModelSpec.parse(model, model_class)
    check_device(device)
    positive("--lambda-span", lambda_span)
    non_negative("--col-beta", col_beta)
    non_negative("--rdoq-gain", rdoq_gain)
    check_outputs([plot], [checkpoint, hessians, *shard_inputs(tokens), tokenizer, sensitivity, *model_inputs(model)])
    cfg = RDConfig(row_mode=row_mode, col_beta=col_beta, rdoq_gain=rdoq_gain)
    sd = load_checkpoint(checkpoint)
    hs, counts = load_hessians(hessians)
    toks = load_tokens(tokens) if tokens is not None else None

    def show(p) -> None:
        if not json_out:
            bpb = "—" if p.bpb is None else f"{p.bpb:.5f}"
            err_console.print(f"{p.pipeline:8s} knob {p.knob:.4g}: {fmt_int(p.bytes)} bytes, BPB {bpb}, "
                              f"encode {p.encode_s:.1f}s, decode {p.decode_s:.2f}s")

    rep = rd_curves(sd, hs, counts, toks, str(tokenizer) if tokenizer else None, names, points, max_seqs, seq_len,
                    _floats(widths, "--widths"), _floats(lambdas, "--lambdas"), lambda_span, cfg,
                    load_sensitivity(sensitivity), codec, on_point=show, eval_float=score_float, record_codec=record_codec,
                    model=spec, device=device)
    if plot is not None:
        plot_rd(rep, plot)
    if json_out:
        print_json(rep.to_dict())
        return
    t = Table(title=f"{checkpoint}: rate–distortion" + (f" (BPB on {rep.eval_tokens:,} tokens)" if rep.eval_tokens else ""))
    for col in ("pipeline", "knob", "bytes", "BPB", "Δ float", "proxy", "encode s", "decode s"):
        t.add_column(col, justify="left" if col == "pipeline" else "right")
    for name in dict.fromkeys(p.pipeline for p in rep.points):
        for p in rep.curve(name):
            d = "—" if p.bpb is None or rep.fp_bpb is None else f"{p.bpb - rep.fp_bpb:+.5f}"
            t.add_row(p.pipeline, f"{p.knob:.4g}", fmt_int(p.bytes), "—" if p.bpb is None else f"{p.bpb:.5f}", d,
                      "—" if p.proxy is None else f"{p.proxy:.4g}", f"{p.encode_s:.1f}", f"{p.decode_s:.2f}")
    console.print(t)
    if rep.fp_bpb is not None:
        console.print(f"float model: BPB {rep.fp_bpb:.5f}")
    cmp = compare(rep) if rep.eval_tokens else {}
    ref = cmp.get("reference")
    for name, c in cmp.items():
        if name == "reference":
            continue
        at_b = "outside the measured range" if c["bpb_at_ref_bytes"] is None else (
            f"BPB {c['bpb_at_ref_bytes']:.5f} ({_more_or_less(c['bpb_margin'], '.5f', 'lower', 'higher')})")
        at_q = "outside the measured range" if c["bytes_at_ref_bpb"] is None else (
            f"{fmt_int(c['bytes_at_ref_bpb'])} bytes ({_more_or_less(c['bytes_margin_pct'], '.2f', 'fewer', 'more', '%')})")
        console.print(f"{name}: at the record's {fmt_int(ref['bytes'])} bytes {at_b}; at its BPB {ref['bpb']:.5f} {at_q}")
    if plot is not None:
        console.print(f"wrote {plot}")
