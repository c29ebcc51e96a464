"""Quantize / pack / verify times and artifact bytes per codec on a real checkpoint.

For each bit width it quantizes once (RTN per row, SDClip width searched for least error, embedding
included), then packs the same quantized model with every codec and with ``auto``/``auto-fast``,
decodes each artifact and checks the checksums and the re-pack byte-identity. All in one run, so
the figures are comparable with each other.

    python benchmarks/bench_speed.py [--checkpoint PATH] [--bits 6 8] [--codecs ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf_pack.checkpoint import load_checkpoint  # noqa: E402
from pgolf_pack.pack import codecs  # noqa: E402
from pgolf_pack.pack.packer import group_choices, pack_model, unpack_model  # noqa: E402
from pgolf_pack.pipeline import quantize_tensors  # noqa: E402
from pgolf_pack.quant.base import dequantize_float32  # noqa: E402
from pgolf_pack.recipe import simple_recipe  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "baseline_9x512_sp1024.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=BENCH)
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--codecs", nargs="+", default=["brotli", "zstd", "lzma", "entropy", "lrzip", "auto-fast", "auto"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    t = time.perf_counter()
    tensors = load_checkpoint(args.checkpoint)
    print(f"loaded {args.checkpoint.name}: {sum(v.numel() for v in tensors.values()):,} params in {time.perf_counter() - t:.2f} s")
    rows = []
    for bits in args.bits:
        t = time.perf_counter()
        qm = quantize_tensors(tensors, simple_recipe(bits=bits))
        tq = time.perf_counter() - t
        print(f"\nint{bits}: quantize {tq:.2f} s")
        print(f"{'codec':>10} {'bytes':>12} {'pack s':>8} {'decode s':>9} {'verify':>7}")
        for codec in args.codecs:
            if codec in ("lrzip", "auto") and not codecs.available("lrzip"):
                print(f"{codec:>10}  skipped: lrzip not installed")
                continue
            t = time.perf_counter()
            res = pack_model(qm, codec=codec)
            tp = time.perf_counter() - t
            t = time.perf_counter()
            qm2, man = unpack_model(res.blob)
            for qt in qm2.tensors:
                dequantize_float32(qt)
            td = time.perf_counter() - t
            same = pack_model(qm2, choices=group_choices(man)).blob == res.blob
            rows.append({"bits": bits, "codec": codec, "bytes": len(res.blob), "quantize_s": tq, "pack_s": tp,
                         "decode_s": td, "repack_identical": same})
            print(f"{codec:>10} {len(res.blob):>12,} {tp:>8.2f} {td:>9.2f} {'ok' if same else 'FAIL':>7}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
