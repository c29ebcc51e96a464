"""The exported decoder on one artifact: its bytes, and how long it takes to load against the package.

For ARTIFACT (e.g. the bench checkpoint's ECSQ + entropy artifact) it writes the decoder
``export-decoder`` would, and measures side by side, in one run, each in a fresh process:

* ``decoder load()``: ``python -I`` in a scratch directory imports the wrapped ``pgp_decode.py``
  and calls ``load(path)``; import and load are timed separately inside the process;
* ``pgolf-pack unpack``: the same artifact through ``python -m pgolf_pack.cli unpack`` (process
  wall time, safetensors write included) and, in-process, ``unpack_model`` + ``dequantize_model``;
* with ``--lrzip``: the same quantized model re-packed with every symbol group on ``lrzip``
  (ZPAQ, the records' codec; slow to encode) and decoded with ``unpack_model``.

Each timing is the median of ``--repeats`` runs. The machine load is printed with the figures.

    python benchmarks/bench_export.py ART [--repeats 3] [--lrzip]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf_pack.pack.packer import pack_model, unpack_model  # noqa: E402
from pgolf_pack.ship.exporter import export_decoder  # noqa: E402
from pgolf_pack.verify import dequantize_model  # noqa: E402

LOAD = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, ".")
import pgp_decode
t1 = time.perf_counter()
sd = pgp_decode.load(sys.argv[1])
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, len(sd))
"""


def _median(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lrzip", action="store_true", help="also time a record-style lrzip (ZPAQ) decode of the same symbols")
    a = ap.parse_args()
    blob = a.artifact.read_bytes()
    dec = export_decoder(blob)
    out: dict = {"artifact": str(a.artifact), "artifact_bytes": len(blob), "decoder": dec.to_dict(),
                 "loadavg": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "pgp_decode.py").write_bytes(dec.wrapped)
        (tmp / "load.py").write_text(LOAD)
        imp, load, cli = [], [], []
        for _ in range(a.repeats):
            r = subprocess.run([sys.executable, "-I", "load.py", str(a.artifact.resolve())], cwd=tmp,
                               capture_output=True, text=True, check=True)
            i, t, _n = r.stdout.split()
            imp.append(float(i))
            load.append(float(t))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pgolf_pack.cli", "unpack", str(a.artifact), "-o", str(tmp / "deq.safetensors")],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, check=True)
            cli.append(time.perf_counter() - t0)
        inproc = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            qm, _ = unpack_model(blob)
            dequantize_model(qm)
            inproc.append(time.perf_counter() - t0)
        out.update(decoder_import_s=_median(imp), decoder_load_s=_median(load), unpack_cli_wall_s=_median(cli),
                   unpack_in_process_s=_median(inproc))
        if a.lrzip:
            qm, manifest = unpack_model(blob)
            choices = {g["name"]: ({"codec": "lrzip", "layout": {"order": "col", "rowsort": True, "shuffle": False, "bitpack": None}}
                                   if g["kind"] == "symbols" else {"codec": "brotli", "shuffle": True}) for g in manifest["groups"]}
            t0 = time.perf_counter()
            lrz = pack_model(qm, choices=choices).blob
            enc = time.perf_counter() - t0
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                unpack_model(lrz)
                times.append(time.perf_counter() - t0)
            out.update(lrzip_bytes=len(lrz), lrzip_encode_s=enc, lrzip_decode_s=_median(times))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
