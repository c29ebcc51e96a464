"""(bytes, BPB) pairs on the bench checkpoint for a list of quantization configurations.

Every configuration goes through the real pipeline: quantize → pack (artifact bytes) → unpack →
dequantize → BPB on the validation shard, so each BPB is the post-roundtrip number. All rows come
from one run, side by side. Calibration (Hessians) must come from TRAIN tokens:

    pgolf-pack calibrate CKPT --tokens 'train_*.bin' -o H.safetensors
    python benchmarks/bench_quality.py --hessians H.safetensors --set gptq   # or rtn, lqer, embed, e8p, all

Configurations are named presets below (so reported figures are reproducible by name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf_pack.calib.bpb import evaluate_bpb  # noqa: E402
from pgolf_pack.calib.hessian import load_hessians  # noqa: E402
from pgolf_pack.calib.adapter import load_model  # noqa: E402
from pgolf_pack.calib.shards import load_tokens  # noqa: E402
from pgolf_pack.checkpoint import load_checkpoint  # noqa: E402
from pgolf_pack.pack.packer import pack_model, unpack_model  # noqa: E402
from pgolf_pack.pipeline import LqerOptions, quantize_tensors  # noqa: E402
from pgolf_pack.recipe import load_recipe, recipe_from_dict  # noqa: E402
from pgolf_pack.verify import dequantize_model  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
RECORD = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "record_1855.toml"


def _r(method: str, bits: int, embed_bits: int | None = None, **kw) -> dict:
    rules = [{"match": "tok_emb.weight", "bits": embed_bits}] if embed_bits else []
    return {"default": {"method": method, "bits": bits, "clip": "sdclip", **kw}, "rule": rules}


def _emb6(recipe: dict) -> dict:
    return {**recipe, "rule": [{"match": "tok_emb.weight", "method": "gptq", "bits": 6}]}


PRESETS: dict[str, dict] = {
    # name: recipe dict (or "record"), optional lqer options, codec
    "rtn-int6": {"recipe": _r("rtn", 6)},
    "rtn-int5": {"recipe": _r("rtn", 5)},
    "rtn-int4": {"recipe": _r("rtn", 4)},
    "gptq-int6": {"recipe": _r("gptq", 6)},
    "gptq-int5": {"recipe": _r("gptq", 5)},
    "gptq-int4": {"recipe": _r("gptq", 4)},
    "record-gptq": {"recipe": "record"},
    "record-gptq-lrzip": {"recipe": "record", "codec": "lrzip"},
    "gptq-int6-lqer1r4": {"recipe": _r("gptq", 6), "lqer": LqerOptions(1, 4, 4, 64, "chol")},
    "gptq-int6-lqer3r4": {"recipe": _r("gptq", 6), "lqer": LqerOptions(3, 4, 4, 64, "chol")},
    "gptq-int6-lqer3r8": {"recipe": _r("gptq", 6), "lqer": LqerOptions(3, 8, 4, 64, "chol")},
    "gptq-int6-lqer3r4-plain": {"recipe": _r("gptq", 6), "lqer": LqerOptions(3, 4, 4, 64, False)},
    "gptq-int6-emb8": {"recipe": _r("gptq", 6, 8)},
    "gptq-int6-emb7": {"recipe": _r("gptq", 6, 7)},
    "gptq-int6-emb-tiers": {"recipe": {**_r("gptq", 6), "rule": [{"match": "tok_emb.weight", "row_bits": "10%:8,rest:6"}]},
                            "tokens": True},
    "e8p-rht-ldlq": {"recipe": _r("e8p", 6, ldlq=True)},
    "e8p-rht": {"recipe": _r("e8p", 6, ldlq=False)},
    "e8p-nornt-ldlq": {"recipe": _r("e8p", 6, rht=False, ldlq=True)},
    "e8p-nornt": {"recipe": _r("e8p", 6, rht=False, ldlq=False)},
    # The tied embedding doubles as the output head; users keep it wide, so compare that way too.
    "e8p-rht-ldlq-emb6": {"recipe": _emb6(_r("e8p", 6, ldlq=True))},
    "e8p-rht-ldlq-fb4": {"recipe": _emb6(_r("e8p", 6, ldlq=True, fallback=4, fallback_bits=4))},
    "gptq-int2-emb6": {"recipe": _emb6(_r("gptq", 2))},
    "gptq-int3-emb6": {"recipe": _emb6(_r("gptq", 3))},
    "gptq-int3": {"recipe": _r("gptq", 3)},
    "gptq-int2": {"recipe": _r("gptq", 2)},
}
SETS = {
    "rtn": ["rtn-int6", "rtn-int5", "rtn-int4"],
    "gptq": ["gptq-int6", "gptq-int5", "gptq-int4", "record-gptq"],
    "lqer": ["gptq-int6", "gptq-int6-lqer1r4", "gptq-int6-lqer3r4", "gptq-int6-lqer3r8", "gptq-int6-lqer3r4-plain"],
    "embed": ["gptq-int6-emb8", "gptq-int6-emb7", "gptq-int6", "gptq-int6-emb-tiers"],
    "e8p": ["e8p-rht-ldlq", "e8p-rht", "e8p-nornt-ldlq", "e8p-nornt", "gptq-int4", "gptq-int3", "gptq-int2"],
    "e8p-emb6": ["e8p-rht-ldlq-emb6", "e8p-rht-ldlq-fb4", "gptq-int2-emb6", "gptq-int3-emb6"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=BENCH / "baseline_9x512_sp1024.safetensors")
    ap.add_argument("--hessians", type=Path)
    ap.add_argument("--val", default=str(BENCH / "pydocs_sp1024_val_*.bin"))
    ap.add_argument("--train", default=str(BENCH / "pydocs_sp1024_train_*.bin"), help="for token-frequency ranking only")
    ap.add_argument("--tokenizer", type=Path, default=BENCH / "tokenizer_pydocs_sp1024.model")
    ap.add_argument("--set", nargs="+", default=["gptq"], help=f"sets: {', '.join(SETS)}; or preset names")
    ap.add_argument("--codec", default="auto-fast")
    ap.add_argument("--max-seqs", type=int, default=None)
    ap.add_argument("--no-fp", action="store_true", help="skip the float baseline row")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tensors = load_checkpoint(args.checkpoint)
    H, counts = load_hessians(args.hessians) if args.hessians else (None, None)
    val = load_tokens(args.val)
    names = [n for s in args.set for n in (SETS.get(s) or [s])]
    rows = []

    def score(sd) -> float:
        return evaluate_bpb(load_model(sd).eval(), val, args.tokenizer, max_seqs=args.max_seqs)["bpb"]

    if not args.no_fp:
        t = time.perf_counter()
        rows.append({"config": "float", "bytes": None, "bpb": score(tensors), "eval_s": time.perf_counter() - t})
        print(f"{'float':<28} {'':>12} {rows[-1]['bpb']:.5f}", flush=True)
    freq = None
    for name in dict.fromkeys(names):
        p = PRESETS[name]
        rec = load_recipe(RECORD) if p["recipe"] == "record" else recipe_from_dict(p["recipe"], name)
        if H is None and any(r.get("method", rec.default.get("method")) == "gptq" for r in [rec.default, *rec.rules]):
            print(f"{name:<28} skipped: needs --hessians")
            continue
        if p.get("tokens") and freq is None:
            from pgolf_pack.quant.mixed_rows import token_counts

            freq = token_counts(load_tokens(args.train), 1024)
        t0 = time.perf_counter()
        qm = quantize_tensors(tensors, rec, H, lqer=p.get("lqer"), token_freq=freq if p.get("tokens") else None)
        t1 = time.perf_counter()
        blob = pack_model(qm, codec=p.get("codec", args.codec)).blob
        t2 = time.perf_counter()
        sd = dequantize_model(unpack_model(blob)[0])
        t3 = time.perf_counter()
        b = score(sd)
        rows.append({"config": name, "bytes": len(blob), "bpb": b, "quantize_s": t1 - t0, "pack_s": t2 - t1,
                     "decode_s": t3 - t2, "eval_s": time.perf_counter() - t3})
        print(f"{name:<28} {len(blob):>12,} {b:.5f}   quantize {t1 - t0:.1f} s, pack {t2 - t1:.1f} s, decode {t3 - t2:.1f} s",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
