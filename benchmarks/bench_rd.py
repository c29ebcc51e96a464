"""Rate–distortion on the bench checkpoint: bytes against post-roundtrip BPB, pipelines side by side.

Record-style GPTQ int6/int7 + SDClip packed with per-group lrzip (the #1 record's pipeline) and
with our coder, against ECSQ / ECSQ+RDOQ / trellis quantization with equal-slope step allocation.
Encode (quantize + pack) and decode (unpack + dequantize) seconds are measured in the same run.

Hessians come from `pgolf-pack calibrate` on train tokens (``--hessians``). Tuning belongs on
training tokens (``--tune``: a slice at the end of the train shard that 64 calibration sequences
do not reach); the validation shard is for the final
figures only. Sensitivities for the allocation are measured on a train slice too (``--sens``;
computed and cached in ``--sens-file`` when missing).

    python benchmarks/bench_rd.py --hessians H.safetensors --tune --max-seqs 16 --pipelines record,trellis --json out.json
    python benchmarks/bench_rd.py --hessians H.safetensors --pipelines record,gptq,trellis --widths 1 --lambdas 1e-7,2e-7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf_pack.analyze.rd import compare, plot_rd, rd_curves  # noqa: E402
from pgolf_pack.calib.hessian import load_hessians  # noqa: E402
from pgolf_pack.calib.shards import read_shard  # noqa: E402
from pgolf_pack.checkpoint import load_checkpoint  # noqa: E402
from pgolf_pack.calib.adapter import load_model  # noqa: E402
from pgolf_pack.calib.sensitivity import measure_sensitivity  # noqa: E402
from pgolf_pack.quant.allocate import RDConfig  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
CKPT = BENCH / "baseline_9x512_sp1024.safetensors"
TRAIN = BENCH / "pydocs_sp1024_train_000000.bin"
VAL = BENCH / "pydocs_sp1024_val_000000.bin"
SP = BENCH / "tokenizer_pydocs_sp1024.model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(CKPT))
    ap.add_argument("--hessians", required=True, help="Hessian file from `pgolf-pack calibrate` (train tokens)")
    ap.add_argument("--tune", action="store_true", help="score on the last --max-seqs sequences of the train shard")
    ap.add_argument("--max-seqs", type=int, default=None)
    ap.add_argument("--pipelines", default="record,gptq,ecsq,rdoq,trellis")
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--widths", default=None, help="record clip-width multipliers, e.g. 1")
    ap.add_argument("--lambdas", default=None, help="λ values for ecsq/rdoq/trellis")
    ap.add_argument("--alloc", default="slope", choices=["slope", "uniform"])
    ap.add_argument("--row-mode", default="flat", choices=["flat", "std"])
    ap.add_argument("--col-beta", type=float, default=1.0)
    ap.add_argument("--rdoq-gain", type=float, default=1.0)
    ap.add_argument("--sens-file", default="sens_perturb.json", help="sensitivity cache (JSON), written when missing")
    ap.add_argument("--no-sens", action="store_true", help="allocate on the raw Hessian proxy")
    ap.add_argument("--sens-seqs", type=int, default=4)
    ap.add_argument("--no-float", action="store_true", help="skip scoring the float model")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    sd = load_checkpoint(args.checkpoint)
    hs, counts = load_hessians(args.hessians)
    train = read_shard(TRAIN)
    if args.tune:
        n = args.max_seqs or 16
        tokens = train[-(n * 1024 + 1):]
    else:
        tokens = read_shard(VAL)
    sens = None
    if not args.no_sens and args.alloc == "slope":
        path = Path(args.sens_file)
        if path.is_file():
            sens = json.loads(path.read_text())
        else:
            mid = len(train) // 2  # away from the tuning slice at the end
            t0 = time.perf_counter()
            s = measure_sensitivity(load_model(sd), hs, train[mid: mid + args.sens_seqs * 1024 + 1], counts,
                                    seqs=args.sens_seqs, names=list(sd))
            sens = s.tensor
            path.write_text(json.dumps(sens, indent=1))
            print(f"measured sensitivities in {time.perf_counter() - t0:.0f}s -> {path}", file=sys.stderr)
    cfg = RDConfig(alloc=args.alloc, row_mode=args.row_mode, col_beta=args.col_beta, rdoq_gain=args.rdoq_gain)
    floats = lambda s: None if s is None else [float(x) for x in s.split(",")]  # noqa: E731

    def show(p) -> None:
        bpb = "—" if p.bpb is None else f"{p.bpb:.5f}"
        print(f"{p.pipeline:8s} knob {p.knob:.4g}: {p.bytes:,} bytes, BPB {bpb}, proxy {p.proxy}, "
              f"encode {p.encode_s:.1f}s, decode {p.decode_s:.2f}s", file=sys.stderr, flush=True)

    rep = rd_curves(sd, hs, counts, tokens, str(SP), args.pipelines.split(","), args.points,
                    args.max_seqs if not args.tune else None, widths=floats(args.widths),
                    lambdas=floats(args.lambdas), cfg=cfg, sensitivity=sens, on_point=show,
                    eval_float=not args.no_float)
    rep.settings["tokens"] = "train tail" if args.tune else "val"
    if args.plot:
        plot_rd(rep, args.plot)
    out = rep.to_dict()
    print(json.dumps(out.get("compare"), indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
