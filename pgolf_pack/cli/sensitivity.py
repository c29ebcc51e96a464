"""sensitivity: measured loss per unit of GPTQ's proxy, per matrix, for the rate–distortion allocation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from .app import JsonOpt, app, console, fmt_int, handle_errors, print_json, progress


@app.command()
@handle_errors
def sensitivity(
    checkpoint: Path = typer.Argument(..., help="checkpoint in the Parameter Golf baseline architecture"),
    hessians: Path = typer.Option(..., help="Hessian file from `pgolf-pack calibrate`"),
    tokens: str = typer.Option(..., help="glob of TRAIN token shards (never the validation shards)"),
    output: Path = typer.Option(..., "-o", "--output", help="JSON file to write: tensor name -> multiplier"),
    seqs: int = typer.Option(4, min=1, help="sequences scored per measurement"),
    seq_len: int = typer.Option(1024, min=2),
    seed: int = typer.Option(0, help="seed for picking the scoring window"),
    json_out: bool = JsonOpt,
) -> None:
    """Quantize one matrix at a time, score the loss on training tokens, and write each matrix's
    loss per unit of trace(ΔW H ΔWᵀ) — the input `quantize --method ecsq|rdoq|trellis --sensitivity`
    and `analyze rd --sensitivity` use to give bits where the loss needs them."""
    import numpy as np

    from ..calib.hessian import load_hessians
    from ..calib.shards import load_tokens
    from ..checkpoint import is_quantizable, load_checkpoint
    from ..errors import PgolfError
    from ..fileio import atomic_write_bytes, check_not_input
    from ..quant.allocate import measure_sensitivity_perturb

    check_not_input(output, checkpoint)
    check_not_input(output, hessians)
    sd = load_checkpoint(checkpoint)
    H, counts = load_hessians(hessians)
    toks = load_tokens(tokens)
    need = seqs * seq_len + 1
    if toks.size < need:
        raise PgolfError(f"{tokens}: {toks.size:,} tokens, need {need:,} for {seqs} sequences of {seq_len}")
    # One contiguous window at a seeded offset: the forward passes stay cheap and repeatable.
    start = int(np.random.default_rng(seed).integers(0, toks.size - need + 1))
    window = toks[start:start + need]
    todo = [n for n, t in sd.items() if n in H and is_quantizable(t, 1)]
    t0 = time.perf_counter()
    with progress(not json_out, len(todo), "sensitivity") as step:
        sens = measure_sensitivity_perturb(sd, H, counts, window, seqs, seq_len, on_tensor=lambda n, r: step(n))
    atomic_write_bytes(output, (json.dumps(sens.to_json(), indent=1) + "\n").encode())
    dt = time.perf_counter() - t0
    if json_out:
        print_json({"output": str(output), "tensors": len(sens.tensor), "tokens": sens.tokens, "seconds": dt,
                    "sensitivity": sens.to_json()})
        return
    vals = sorted(sens.tensor.items(), key=lambda kv: -kv[1])
    console.print(f"wrote {output}: {len(vals)} matrices, {fmt_int(sens.tokens)} tokens, {dt:.1f} s")
    if vals:
        console.print(f"most sensitive {vals[0][0]} {vals[0][1]:.3g}; least {vals[-1][0]} {vals[-1][1]:.3g} "
                      f"(span ×{vals[0][1] / max(vals[-1][1], 1e-300):.3g})")
