"""sensitivity: measured loss per unit of GPTQ's proxy, per matrix, for the rate–distortion allocation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from ..checkpoint import DEFAULT_MIN_NUMEL

from .app import JsonOpt, app, console, fmt_int, handle_errors, print_json, progress
from .model_opts import DeviceOpt, ModelClassOpt, ModelOpt, build_cli_model, model_line


@app.command()
@handle_errors
def sensitivity(
    checkpoint: Path = typer.Argument(..., help="checkpoint (state dict) of the model"),
    hessians: Path = typer.Option(..., help="Hessian file from `pgolf-pack calibrate`"),
    tokens: str = typer.Option(..., help="glob of TRAIN token shards (never the validation shards)"),
    output: Path = typer.Option(..., "-o", "--output", help="JSON file to write: tensor name -> multiplier"),
    seqs: int = typer.Option(4, min=1, help="sequences scored per measurement"),
    seq_len: int = typer.Option(1024, min=2),
    seed: int = typer.Option(0, help="seed for picking the scoring window"),
    min_numel: int = typer.Option(DEFAULT_MIN_NUMEL, help="matrices with fewer elements stay in float in quantize, "
                                  "so they are not measured (match quantize's --min-numel)"),
    guide: bool = typer.Option(True, "--guide/--no-guide", help="skip ladder steps a loss-curvature estimate says "
                               "would change the loss too little to count (the measurement still decides)"),
    device: str = DeviceOpt,
    model: Optional[str] = ModelOpt,
    model_class: Optional[str] = ModelClassOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Quantize one matrix at a time, score the loss on training tokens, and write each matrix's
    loss per unit of trace(ΔW H ΔWᵀ) — the input `quantize --method ecsq|rdoq|trellis --sensitivity`
    and `analyze rd --sensitivity` use to give bits where the loss needs them."""
    import numpy as np

    from ..calib.adapter import check_device
    from ..calib.hessian import load_hessians
    from ..calib.sensitivity import measure_sensitivity
    from ..calib.shards import load_tokens
    from ..checkpoint import is_quantizable, load_checkpoint
    from ..errors import PgolfError
    from ..fileio import atomic_write_bytes, check_outputs
    from .checks import at_least, model_inputs, shard_inputs

    at_least("--min-numel", min_numel, 0)
    at_least("--seed", seed, 0)
    check_device(device)
    check_outputs([output], [checkpoint, hessians, *shard_inputs(tokens), *model_inputs(model)])
    sd = load_checkpoint(checkpoint)
    H, counts = load_hessians(hessians)
    toks = load_tokens(tokens)
    need = seqs * seq_len + 1
    if toks.size < need:
        raise PgolfError(f"{tokens}: {toks.size:,} tokens, need {need:,} for {seqs} sequences of {seq_len}")
    # One contiguous window at a seeded offset: the forward passes stay cheap and repeatable.
    start = int(np.random.default_rng(seed).integers(0, toks.size - need + 1))
    window = toks[start:start + need]
    loaded = build_cli_model(sd, model, model_class, device)
    todo = [n for n, t in sd.items() if n in H and is_quantizable(t, min_numel)]
    if not todo:
        raise PgolfError(f"no matrix of {checkpoint} has both a Hessian in {hessians} and at least {min_numel:,} elements")
    t0 = time.perf_counter()
    with progress(not json_out, len(todo), "sensitivity") as step:
        sens = measure_sensitivity(loaded, H, window, counts, seqs, seq_len, min_numel=min_numel, names=list(sd),
                                   on_tensor=lambda n, r: step(n), guide=guide)
    atomic_write_bytes(output, (json.dumps(sens.to_json(), indent=1) + "\n").encode())
    dt = time.perf_counter() - t0
    if json_out:
        print_json({"output": str(output), "tensors": len(sens.tensor), "tokens": sens.tokens, "seconds": dt,
                    "forwards": sens.forwards, "skipped": sens.skipped,
                    "sensitivity": sens.to_json(), **({"model": loaded.to_dict()} if model is not None else {})})
        return
    vals = sorted(sens.tensor.items(), key=lambda kv: -kv[1])
    console.print(f"{model_line(loaded, model)}wrote {output}: {len(vals)} matrices, {fmt_int(sens.tokens)} tokens, "
                  f"{sens.forwards} scoring passes ({sens.skipped} steps skipped), {dt:.1f} s", markup=False)
    if vals:
        console.print(f"most sensitive {vals[0][0]} {vals[0][1]:.3g}; least {vals[-1][0]} {vals[-1][1]:.3g} "
                      f"(span ×{vals[0][1] / max(vals[-1][1], 1e-300):.3g})")
