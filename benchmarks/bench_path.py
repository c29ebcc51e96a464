"""The whole path, stage by stage, in seconds: the record-style pipeline against ours, one run.

Record-style: calibrate (Hessians), GPTQ int6 + SDClip (the #1 record's recipe,
examples/recipes/record_1855.toml) packed with per-group lrzip, decode. Ours: the same calibrate,
sensitivity, ``quantize --method ecsq --budget`` at the record artifact's size (so both land on
the same bytes), decode. The calibrate stage is shared: both pipelines need Hessians. Prints each
stage's seconds, the totals and the ratio ours / record; ``--json`` writes them.

    python benchmarks/bench_path.py                 # the bench checkpoint (../shared/bench)
    python benchmarks/bench_path.py --example       # the bundled example: proves the script runs
    python benchmarks/bench_path.py --device cuda   # calibrate, sensitivity and the quantize sweeps on the GPU
    python benchmarks/bench_path.py --score         # also both artifacts' val BPB: (bytes, BPB) pairs

After the path, our artifact's symbols are packed again alone with ``entropy`` and with
``auto-fast`` (the pack-only figures, and their ratio).

Each stage's line says where it ran: ``--device`` carries calibrate, sensitivity (its forward passes) and both
quantize stages (GPTQ / ECSQ sweeps; packing is CPU work either way); decode is always CPU.
Run it alone on the machine: every figure is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pgolf_pack.api import RDPlan, RecipePlan, quantize  # noqa: E402
from pgolf_pack.calib.bpb import evaluate_bpb  # noqa: E402
from pgolf_pack.calib.adapter import build_model, check_device  # noqa: E402
from pgolf_pack.calib.calibrate import calibration_batches, collect_hessians  # noqa: E402
from pgolf_pack.calib.sensitivity import measure_sensitivity  # noqa: E402
from pgolf_pack.calib.shards import load_tokens  # noqa: E402
from pgolf_pack.checkpoint import DEFAULT_MIN_NUMEL, load_checkpoint  # noqa: E402
from pgolf_pack.errors import PgolfError  # noqa: E402
from pgolf_pack.pack import codecs  # noqa: E402
from pgolf_pack.pack.packer import pack_model, unpack_model  # noqa: E402
from pgolf_pack.quant.allocate import RDConfig  # noqa: E402
from pgolf_pack.quant.base import dequantize_float32  # noqa: E402
from pgolf_pack.verify import dequantize_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
RECORD_RECIPE = ROOT / "examples" / "recipes" / "record_1855.toml"
TARGETS = {
    "bench": (BENCH / "baseline_9x512_sp1024.safetensors", str(BENCH / "pydocs_sp1024_train_*.bin")),
    "example": (ROOT / "examples" / "tiny_gpt.safetensors", str(ROOT / "examples" / "tiny_train_*.bin")),
}
SCORING = {  # validation tokens and tokenizer, for --score only
    "bench": (str(BENCH / "pydocs_sp1024_val_*.bin"), BENCH / "tokenizer_pydocs_sp1024.model"),
    "example": (str(ROOT / "examples" / "tiny_val_*.bin"), ROOT / "examples" / "tiny_sp512.model"),
}


def timed(stages: dict, name: str, device: str, fn, where: dict):
    t = time.perf_counter()
    out = fn()
    stages[name] = time.perf_counter() - t
    where[name] = device
    print(f"  {name:<22} {stages[name]:8.2f} s   on {device}", flush=True)
    return out


def decode(blob: bytes) -> None:
    qm, _ = unpack_model(blob)
    for t in qm.tensors:
        dequantize_float32(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", action="store_true", help="the bundled example instead of the bench checkpoint")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--tokens", default=None, help="glob of TRAIN token shards (calibration and sensitivity)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--sens-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--record-codec", default="lrzip", help="the record pipeline's codec (lrzip; another where it is missing)")
    ap.add_argument("--budget", type=int, default=None, help="our budget (default: the record artifact's bytes)")
    ap.add_argument("--score", action="store_true", help="score both artifacts' val BPB (full val shard: minutes)")
    ap.add_argument("--max-seqs", type=int, default=None, help="with --score: the first N val sequences only")
    ap.add_argument("--save", type=Path, default=None, help="write both artifacts into this folder (record.pgp, ours.pgp)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    try:
        check_device(args.device)
    except PgolfError as e:
        sys.exit(f"error: {e}")
    ckpt, tokens_glob = TARGETS["example" if args.example else "bench"]
    ckpt, tokens_glob = args.checkpoint or ckpt, args.tokens or tokens_glob
    if args.record_codec not in codecs.CODECS or not codecs.get(args.record_codec).available():
        sys.exit(f"error: codec {args.record_codec} is not available here (--record-codec zstd, for instance)")

    sd = load_checkpoint(ckpt)
    toks = load_tokens(tokens_glob)
    print(f"{ckpt.name}: {sum(t.numel() for t in sd.values()):,} parameters; {toks.size:,} train tokens; "
          f"device {args.device}")
    shared: dict[str, float] = {}
    record: dict[str, float] = {}
    ours: dict[str, float] = {}
    devices: dict[str, dict[str, str]] = {"shared": {}, "record": {}, "ours": {}}  # pipeline -> stage -> device
    dev = args.device

    print("shared")
    loaded = build_model(sd, device=args.device)
    H, counts = timed(shared, "calibrate", dev, lambda: collect_hessians(
        loaded, calibration_batches(toks, args.calib_seqs, args.seq_len)), devices["shared"])

    print(f"record-style (GPTQ int6 + SDClip, per-group {args.record_codec})")
    rec = timed(record, "quantize+pack", dev, lambda: quantize(
        sd, RecipePlan(recipe=RECORD_RECIPE, codec=args.record_codec), hessians=H, counts=counts, device=dev), devices["record"])
    timed(record, "decode", "cpu", lambda: decode(rec.blob), devices["record"])

    budget = args.budget or rec.bytes
    print(f"ours (sensitivity, ECSQ at a {budget:,}-byte budget, entropy coder)")
    need = args.sens_seqs * args.seq_len + 1
    window = toks[(toks.size - need) // 2:][:need]  # the middle of the shard, as a contiguous window
    sens = timed(ours, "sensitivity", dev, lambda: measure_sensitivity(
        loaded, H, window, counts, args.sens_seqs, args.seq_len, min_numel=DEFAULT_MIN_NUMEL, names=list(sd)), devices["ours"])
    mine = timed(ours, "quantize+pack (budget)", dev, lambda: quantize(
        sd, RDPlan(budget=budget, sensitivity=sens.tensor, config=RDConfig(method="ecsq")), hessians=H, counts=counts,
        device=dev), devices["ours"])
    timed(ours, "decode", "cpu", lambda: decode(mine.blob), devices["ours"])

    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / "record.pgp").write_bytes(rec.blob)
        (args.save / "ours.pgp").write_bytes(mine.blob)
    print("pack only (our artifact's symbols again)")
    packs: dict[str, float] = {}
    ent = timed(packs, "entropy", "cpu", lambda: pack_model(mine.qm, codec="entropy"), {})
    fast = timed(packs, "auto-fast", "cpu", lambda: pack_model(mine.qm, codec="auto-fast"), {})
    print(f"  auto-fast / entropy    ×{packs['auto-fast'] / packs['entropy']:.2f} "
          f"({len(fast.blob):,} vs {len(ent.blob):,} bytes)")
    scores: dict[str, float] = {}
    if args.score:
        val_glob, sp_model = SCORING["example" if args.example else "bench"]
        val = load_tokens(val_glob)
        print(f"val BPB ({'all' if args.max_seqs is None else args.max_seqs} sequences of {val_glob})")
        for name, blob in (("record-style", rec.blob), ("ours", mine.blob)):
            model = build_model(dequantize_model(unpack_model(blob)[0]), device=args.device)
            scores[name] = evaluate_bpb(model, val, sp_model, seq_len=args.seq_len, max_seqs=args.max_seqs)["bpb"]
            print(f"  {name:<14} {len(blob):>12,} bytes  BPB {scores[name]:.5f}", flush=True)

    rec_total = shared["calibrate"] + sum(record.values())
    our_total = shared["calibrate"] + sum(ours.values())
    encode_ratio = ours["quantize+pack (budget)"] / record["quantize+pack"]
    print("\nsummary")
    print(f"  record-style: {rec.bytes:,} bytes; encode {record['quantize+pack']:.2f} s; total {rec_total:.2f} s")
    print(f"  ours:         {mine.bytes:,} bytes; encode {ours['quantize+pack (budget)']:.2f} s "
          f"({len(mine.history)} real packs); total {our_total:.2f} s")
    print(f"  ratio ours/record: encode ×{encode_ratio:.2f}, whole path ×{our_total / rec_total:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "checkpoint": str(ckpt), "device": args.device, "devices": devices, "shared": shared, "record": record, "ours": ours,
            "record_bytes": rec.bytes, "ours_bytes": mine.bytes, "budget": budget, "lambda": mine.lam,
            "real_packs": [{"lambda": p.lam, "bytes": p.bytes, "seconds": p.seconds} for p in mine.history],
            "totals": {"record": rec_total, "ours": our_total},
            "ratios": {"encode": encode_ratio, "total": our_total / rec_total},
            "pack_only": {**packs, "entropy_bytes": len(ent.blob), "auto_fast_bytes": len(fast.blob)},
            "bpb": scores,
            "sensitivity_span": float(np.max(list(sens.tensor.values())) / max(np.min(list(sens.tensor.values())), 1e-300)),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
