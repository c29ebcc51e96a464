"""Entropy codec vs the record packers on the bench checkpoint's int6/int7 RTN symbols.

Symbols: RTN SDClip per row, int6 at 12.85 sigma for block matrices and int7 at 14 sigma for the
embedding (the records' recipe). Per role group (all layers together) it prints the order-0
bound (sum of per-tensor empirical entropies), our models, byte-shuffle + brotli-11 (row-major,
the V4096-style record packer) and ``lrzip -z -L 9 -T`` on column-major bytes after an L1 row sort
(the #1 record's per-group packer; its row permutations are counted separately). Sizes are
symbols only (row scales are the same for every packer). ``auto s`` is the time of
``entropy_encode(model="auto")`` (fit every candidate model, code, keep the smallest); ``dec s``
decodes the chosen model.

    python benchmarks/bench_entropy.py [--checkpoint PATH] [--no-lrzip] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import brotli
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf_pack.coding.entropy import MODELS, entropy_decode, entropy_encode, fit_models  # noqa: E402
from pgolf_pack.quant.rtn import quantize_rtn  # noqa: E402

DEFAULT_CKPT = "/work/shared/bench/baseline_9x512_sp1024.safetensors"
ROLES = ("tok_emb", "c_q", "c_k", "c_v", "attn.proj", "mlp.fc", "mlp.proj")


def role_of(name: str) -> str | None:
    for r in ROLES:
        if r in name:
            return r
    return None


def load_groups(path: str) -> dict[str, tuple[list[np.ndarray], int, int]]:
    from safetensors.torch import load_file

    sd = load_file(path)
    groups: dict[str, tuple[list[np.ndarray], int, int]] = {}
    for name, w in sd.items():
        if w.ndim != 2 or w.numel() < 65536 or role_of(name) is None:
            continue
        emb = name.startswith("tok_emb")
        bits, sig = (7, 14.0) if emb else (6, 12.85)
        qt = quantize_rtn(name, w.float().numpy(), str(w.dtype), bits=bits, clip="sdclip", sigmas=sig)
        r = (1 << (bits - 1)) - 1
        arrs, _, _ = groups.setdefault(role_of(name), ([], -r, r))
        arrs.append(qt.streams["q"].data.reshape(w.shape))
    return {r: groups[r] for r in ROLES if r in groups}


def h0_bytes(arrays: list[np.ndarray]) -> float:
    bits = 0.0
    for a in arrays:
        c = np.unique(a, return_counts=True)[1].astype(np.float64)
        bits += float(-(c * np.log2(c / c.sum())).sum())
    return bits / 8


def byte_shuffle(data: np.ndarray) -> bytes:
    b = np.ascontiguousarray(data).view(np.uint8).reshape(-1, data.dtype.itemsize)
    return b.T.tobytes()


def brotli_bytes(arrays: list[np.ndarray]) -> int:
    raw = b"".join(byte_shuffle(a.ravel()) for a in arrays)
    return len(brotli.compress(raw, quality=11, lgwin=24))


def l1_chain(m: np.ndarray) -> np.ndarray:
    try:
        from pgolf_pack.kernels.rowsort import l1_chain_order

        return np.asarray(l1_chain_order(m), dtype=np.int64)
    except Exception:  # the kernel module may be missing or mid-edit; the numpy chain is exact too
        x = m.astype(np.int32)
        n = len(x)
        used = np.zeros(n, bool)
        perm = np.empty(n, np.int64)
        cur = 0
        used[0], perm[0] = True, 0
        for i in range(1, n):
            d = np.abs(x - x[cur]).sum(axis=1).astype(np.int64)
            d[used] = np.iinfo(np.int64).max
            cur = int(np.argmin(d))
            used[cur], perm[i] = True, cur
        return perm


def lrzip_bytes(arrays: list[np.ndarray]) -> tuple[int, int, float]:
    """(lrzip bytes of sorted column-major symbols, brotli bytes of the uint16 row permutations, seconds)."""
    t0 = time.perf_counter()
    perms = [l1_chain(a) for a in arrays]
    raw = b"".join(np.ascontiguousarray(a[p].T).astype(np.int8).tobytes() for a, p in zip(arrays, perms))
    perm_raw = b"".join(p.astype("<u2").tobytes() for p in perms)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "g.bin"
        src.write_bytes(raw)
        env = dict(os.environ, LRZIP="NOCONFIG")
        subprocess.run(["lrzip", "-q", "-z", "-L", "9", "-T", "-o", str(src) + ".lrz", str(src)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        size = (Path(d) / "g.bin.lrz").stat().st_size
    return size, len(brotli.compress(perm_raw, quality=11)), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=DEFAULT_CKPT)
    ap.add_argument("--no-lrzip", action="store_true", help="skip the slow lrzip/ZPAQ baseline")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    groups = load_groups(args.checkpoint)
    cols = ["group", "symbols", "H0 bound", *MODELS, "auto", "vs H0", "brotli-11", "lrzip+sort", "perm", "auto vs lrzip+perm",
            "est err", "auto s", "dec s", "lrzip s"]
    print(" | ".join(cols))
    rows, total = [], {}
    for g, (arrs, lo, hi) in groups.items():
        rec: dict[str, float | str] = {"group": g, "symbols": int(sum(a.size for a in arrs)), "H0 bound": h0_bytes(arrs)}
        est_err = 0.0
        for f in fit_models(arrs, lo, hi):
            rec[f.model] = len(f.encode())
            est_err = max(est_err, abs(f.bits() / 8 / rec[f.model] - 1))
        t0 = time.perf_counter()
        best = entropy_encode(arrs, lo, hi)  # what a packer runs: fit the candidates, keep the smallest
        rec["auto s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = entropy_decode(best, [a.shape for a in arrs], [str(a.dtype) for a in arrs], lo, hi)
        rec["dec s"] = time.perf_counter() - t0
        if not all(np.array_equal(a, b) for a, b in zip(arrs, out)):
            raise SystemExit(f"{g}: roundtrip mismatch")
        rec["auto"] = len(best)
        rec["est err"] = est_err
        rec["brotli-11"] = brotli_bytes(arrs)
        if not args.no_lrzip:
            rec["lrzip+sort"], rec["perm"], rec["lrzip s"] = lrzip_bytes(arrs)
        rows.append(rec)
        for k, v in rec.items():
            if k == "est err":
                total[k] = max(total.get(k, 0.0), v)
            elif k != "group":
                total[k] = total.get(k, 0) + v
        _print_row(rec, cols)
    total["group"] = "total"
    _print_row(total, cols)
    if args.json:
        Path(args.json).write_text(json.dumps(rows + [total], indent=1, default=float))


def _print_row(rec: dict, cols: list[str]) -> None:
    out = []
    for c in cols:
        v = rec.get(c)
        if c == "vs H0":
            v = f"{rec['auto'] / rec['H0 bound'] - 1:+.2%}"
        elif c == "est err":
            v = f"{v:.4%}"
        elif c == "auto vs lrzip+perm":
            v = f"{rec['auto'] / (rec['lrzip+sort'] + rec['perm']) - 1:+.2%}" if "perm" in rec else None
        elif isinstance(v, float) and c.endswith(" s"):
            v = f"{v:.2f}"
        elif isinstance(v, (int, float)):
            v = f"{int(round(v)):,}"
        out.append("-" if v is None else str(v))
    print(" | ".join(out), flush=True)


if __name__ == "__main__":
    main()
