"""calibrate (Hessians for GPTQ) and eval (BPB as the challenge computes it), for any model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..fileio import check_outputs
from .app import JsonOpt, app, console, err_console, handle_errors, print_json, progress
from .checks import at_least, model_inputs, shard_inputs
from .model_opts import DeviceOpt, ModelClassOpt, ModelOpt, build_cli_model, model_line, reference_overrides


def _advance(step):
    done = [0]

    def on_batch(n, _total):
        for _ in range(n - done[0]):
            step(f"{n}/{_total}")
        done[0] = n

    return on_batch


def _with_uses(name: str, uses: dict) -> str:
    how = [u for u in uses.get(name, []) if u != "embedding"]
    return f"{name} (used through {', '.join(how)})" if how else name


@app.command()
@handle_errors
def calibrate(
    checkpoint: Path = typer.Argument(..., help="checkpoint (state dict) of the model"),
    tokens: str = typer.Option(..., help="glob of TRAIN token shards (never the validation shards)"),
    output: Path = typer.Option(..., "-o", "--output", help="Hessian safetensors file to write"),
    seqs: int = typer.Option(64, help="number of calibration sequences"),
    seq_len: int = typer.Option(1024),
    batch: int = typer.Option(4, help="sequences per forward pass"),
    device: str = DeviceOpt,
    seed: int = typer.Option(0, help="seed for picking the calibration windows"),
    model: Optional[str] = ModelOpt,
    model_class: Optional[str] = ModelClassOpt,
    tied_head: Optional[str] = typer.Option(
        None, help="MODULE=WEIGHT: WEIGHT is a tied output head applied to MODULE's output some way other than "
        "F.linear(x, WEIGHT) (which is found by itself), e.g. final_norm=tok_emb.weight"),
    num_heads: Optional[int] = typer.Option(None, help="reference GPT: attention heads (inferred from shapes when omitted)"),
    num_kv_heads: Optional[int] = typer.Option(None, help="reference GPT: key/value heads"),
    json_out: bool = JsonOpt,
) -> None:
    """Collect GPTQ Hessians H = Σ xᵀx by running the model over calibration tokens."""
    import time

    from ..calib.adapter import check_device, parse_tied_head
    from ..calib.calibrate import calibration_batches, collect_hessians, weights_without_hessian
    from ..calib.hessian import save_hessians
    from ..calib.shards import load_tokens
    from ..checkpoint import load_checkpoint

    for flag, v in (("--seqs", seqs), ("--batch", batch), ("--num-heads", num_heads), ("--num-kv-heads", num_kv_heads)):
        at_least(flag, v)
    at_least("--seq-len", seq_len, 2)
    at_least("--seed", seed, 0)
    check_device(device)
    check_outputs([output], [checkpoint, *shard_inputs(tokens), *model_inputs(model)])
    tied = parse_tied_head(tied_head)
    sd = load_checkpoint(checkpoint)
    toks = load_tokens(tokens, max_tokens=None)
    batches = calibration_batches(toks, seqs, seq_len, batch, seed)
    got = sum(int(b[0].shape[0]) for b in batches)
    if got < seqs:
        err_console.print(f"warning: {tokens} holds only {got:,} windows of {seq_len:,} tokens, fewer than --seqs {seqs:,}; "
                          f"calibrating on {got:,}", markup=False, soft_wrap=True)
    loaded = build_cli_model(sd, model, model_class, device, reference_overrides(num_heads, num_kv_heads), tied)
    t0 = time.perf_counter()
    with progress(not json_out, len(batches), "calibrate") as step:
        uses: dict = {}
        H, counts = collect_hessians(loaded, batches, progress=_advance(step), uses=uses)
    missing = weights_without_hessian(loaded.module, H)
    meta = {"checkpoint": Path(checkpoint).name, "seqs": got, "seq_len": seq_len, "seed": seed, "tokens": tokens}
    if model is not None:
        meta["model"] = loaded.to_dict()
    save_hessians(output, H, counts, meta)
    dt = time.perf_counter() - t0
    if missing:
        err_console.print(
            f"warning: no Hessian for {', '.join(_with_uses(n, uses) for n in missing)}: not the weight of a Linear-like "
            "module, of an F.linear call on the parameter itself, or a --tied-head; a cast, slice or `x @ W.T` cannot "
            "be traced. Quantize them without --hessians, collect them in your script (HessianCollector), or name the "
            "module feeding a tied head with --tied-head MODULE=WEIGHT", markup=False, soft_wrap=True)
        # The challenge's names: a tied head fed by final_norm is the usual case, so spell the flag out.
        if "tok_emb.weight" in missing and "final_norm" in dict(loaded.module.named_modules()):
            err_console.print("hint: if tok_emb.weight is the tied output head applied to final_norm's output, rerun "
                              "with --tied-head final_norm=tok_emb.weight", markup=False, soft_wrap=True)
    rows = max(counts.values(), default=0)
    if json_out:
        print_json({"output": str(output), "tensors": len(H), "rows": rows, "seconds": dt, "no_hessian": missing,
                    **({"model": loaded.to_dict()} if model is not None else {})})
    else:
        console.print(f"{model_line(loaded, model)}wrote {output}: Hessians for {len(H)} weights from {rows:,} rows "
                      f"in {dt:.1f} s", markup=False)


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
    device: str = DeviceOpt,
    model: Optional[str] = ModelOpt,
    model_class: Optional[str] = ModelClassOpt,
    num_heads: Optional[int] = typer.Option(None, help="reference GPT: attention heads"),
    num_kv_heads: Optional[int] = typer.Option(None, help="reference GPT: key/value heads"),
    json_out: bool = JsonOpt,
) -> None:
    """Validation loss and bits-per-byte as the challenge computes them."""
    from ..calib.adapter import check_device
    from ..calib.bpb import evaluate_bpb
    from ..calib.calibrate import state_dict_of
    from ..calib.shards import load_tokens
    from ..errors import PgolfError

    for flag, v in (("--seq-len", seq_len), ("--batch", batch), ("--max-seqs", max_seqs), ("--num-heads", num_heads),
                    ("--num-kv-heads", num_kv_heads)):
        at_least(flag, v)
    check_device(device)
    if not Path(tokenizer).is_file():
        raise PgolfError(f"tokenizer not found: {tokenizer}")
    sd = state_dict_of(model_file)
    loaded = build_cli_model(sd, model, model_class, device, reference_overrides(num_heads, num_kv_heads))
    toks = load_tokens(tokens)
    total = (toks.size - 1) // seq_len if max_seqs is None else min(max_seqs, (toks.size - 1) // seq_len)
    with progress(not json_out, total, "eval") as step:
        res = evaluate_bpb(loaded, toks, tokenizer, seq_len, batch, max_seqs, _advance(step), autocast_bf16=bf16)
    if json_out:
        print_json({"model": str(model_file), **res, **({"architecture": loaded.to_dict()} if model is not None else {})})
    else:
        console.print(f"{model_line(loaded, model)}{model_file}: val loss {res['loss']:.5f} nats/token, val BPB "
                      f"{res['bpb']:.5f} ({res['tokens']:,} tokens, {res['bytes']:,} bytes, {res['seconds']:.1f} s)",
                      markup=False)
