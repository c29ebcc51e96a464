"""calibrate (Hessians for GPTQ) and eval (BPB as the challenge computes it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..fileio import check_not_input
from .app import JsonOpt, app, console, handle_errors, print_json, progress


def _overrides(num_heads: Optional[int], num_kv_heads: Optional[int]) -> dict:
    o = {}
    if num_heads:
        o["num_heads"] = num_heads
    if num_kv_heads:
        o["num_kv_heads"] = num_kv_heads
    return o


@app.command()
@handle_errors
def calibrate(
    checkpoint: Path = typer.Argument(..., help="checkpoint in the Parameter Golf baseline architecture"),
    tokens: str = typer.Option(..., help="glob of TRAIN token shards (never the validation shards)"),
    output: Path = typer.Option(..., "-o", "--output", help="Hessian safetensors file to write"),
    seqs: int = typer.Option(64, help="number of calibration sequences"),
    seq_len: int = typer.Option(1024),
    batch: int = typer.Option(4, help="sequences per forward pass"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    seed: int = typer.Option(0, help="seed for picking the calibration windows"),
    num_heads: Optional[int] = typer.Option(None, help="attention heads (inferred from shapes when omitted)"),
    num_kv_heads: Optional[int] = typer.Option(None),
    json_out: bool = JsonOpt,
) -> None:
    """Collect GPTQ Hessians H = Σ xᵀx by running the reference model over calibration tokens."""
    from ..calib.calibrate import collect_hessians
    from ..calib.hessian import save_hessians
    from ..calib.shards import load_tokens
    from ..checkpoint import load_checkpoint

    check_not_input(output, checkpoint)
    sd = load_checkpoint(checkpoint)
    toks = load_tokens(tokens, max_tokens=None)
    t0 = time.perf_counter()
    with progress(not json_out, seqs, "calibrate") as step:
        done = [0]

        def on_batch(n, total):
            for _ in range(n - done[0]):
                step(f"{n}/{total} seqs")
            done[0] = n

        H, counts = collect_hessians(sd, toks, seqs, seq_len, batch, device, seed, on_batch, **_overrides(num_heads, num_kv_heads))
    meta = {"checkpoint": Path(checkpoint).name, "seqs": seqs, "seq_len": seq_len, "seed": seed, "tokens": tokens}
    save_hessians(output, H, counts, meta)
    dt = time.perf_counter() - t0
    if json_out:
        print_json({"output": str(output), "tensors": len(H), "rows": max(counts.values(), default=0), "seconds": dt})
    else:
        console.print(f"wrote {output}: Hessians for {len(H)} weights from {max(counts.values(), default=0):,} rows in {dt:.1f} s")


@app.command("eval")
@handle_errors
def eval_cmd(
    model_file: Path = typer.Argument(..., help="checkpoint or pgolf-pack artifact (decoded first)"),
    tokens: str = typer.Option(..., help="glob of validation token shards"),
    tokenizer: Path = typer.Option(..., help="sentencepiece .model the shards were made with"),
    seq_len: int = typer.Option(1024),
    batch: int = typer.Option(8, help="sequences per forward pass"),
    max_seqs: Optional[int] = typer.Option(None, help="score only the first N sequences"),
    bf16: bool = typer.Option(False, help="bf16 autocast, as the challenge's GPU eval runs"),
    device: str = typer.Option("cpu"),
    num_heads: Optional[int] = typer.Option(None),
    num_kv_heads: Optional[int] = typer.Option(None),
    json_out: bool = JsonOpt,
) -> None:
    """Validation loss and bits-per-byte as the challenge computes them."""
    import torch

    from ..calib.bpb import evaluate_bpb
    from ..calib.calibrate import state_dict_of
    from ..calib.model import load_model
    from ..calib.shards import load_tokens
    from ..errors import PgolfError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PgolfError("--device cuda requested but no CUDA device is available")
    if not Path(tokenizer).is_file():
        raise PgolfError(f"tokenizer not found: {tokenizer}")
    sd = state_dict_of(model_file)
    model = load_model(sd, **_overrides(num_heads, num_kv_heads)).to(device).eval()
    toks = load_tokens(tokens)
    total = (toks.size - 1) // seq_len if max_seqs is None else min(max_seqs, (toks.size - 1) // seq_len)
    with progress(not json_out, total, "eval") as step:
        done = [0]

        def on_batch(n, _total):
            for _ in range(n - done[0]):
                step("")
            done[0] = n

        res = evaluate_bpb(model, toks, tokenizer, seq_len, batch, max_seqs, on_batch, autocast_bf16=bf16)
    if json_out:
        print_json({"model": str(model_file), **res})
    else:
        console.print(f"{model_file}: val loss {res['loss']:.5f} nats/token, val BPB {res['bpb']:.5f} "
                      f"({res['tokens']:,} tokens, {res['bytes']:,} bytes, {res['seconds']:.1f} s)")
