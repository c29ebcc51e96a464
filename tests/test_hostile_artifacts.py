"""Hostile artifacts: crafted files whose checksums are all valid, and still lie.

Each crafted artifact starts from a real small artifact (every scheme, LQER, row tiers, float16
and bfloat16 passthrough) packed by ``pack_model``; its manifest is edited and re-serialised with
valid CRCs (``write_container``, or a raw header for edits ``write_container`` would repair, such
as offsets). Every case must fail with an ArtifactError through the API and one ``error:`` line
through ``unpack``, ``verify-roundtrip`` and ``inspect`` (payload bombs: the two commands that
decode payloads; ``inspect`` lists a valid manifest without decoding), run in a child process under an
address-space limit a correct decoder stays far below, with its peak RSS watched per case so a
decoder that inflates a bomb before refusing it cannot pass by luck.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import brotli
import lzma
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import make_state_dict
from pgolf_pack.cli import app
from pgolf_pack.errors import ArtifactError, PgolfError
from pgolf_pack.pack import codecs
from pgolf_pack.pack.container import _HEAD, FORMAT_VERSION, MAGIC, crc32, read_container, write_container
from pgolf_pack.pack.manifest_check import ENV_MAX_DECODED, MAX_DEPTH, MAX_MANIFEST_BYTES
from pgolf_pack.pack.packer import group_choices, pack_model, unpack_model
from pgolf_pack.pipeline import quantize_tensors
from pgolf_pack.quant.base import QuantizedModel, QuantizedTensor, Stream, dequantize_tensor
from pgolf_pack.recipe import Recipe
from pgolf_pack.verify import dequantize_model

HERE = Path(__file__).parent
# Measured on the 2-core project machine with the child's settings below: the whole corpus run
# (untouched artifact through every command, then every crafted case) peaks at 0.95 GiB of address
# space (torch, numba and constriction mapped) and 370-390 MB RSS; no crafted case grows the peak
# RSS by more than 22 MB (the manifest bomb, refused at 16 MiB). Any of the bombs inflated crosses both.
AS_LIMIT = int(1.5 * 2**30)
RSS_GROWTH_LIMIT_MB = 64
BOMB = 1 << 30  # bytes a bomb inflates to

RULES = [
    {"match": "blocks.0.attn.c_q.weight", "method": "e8p"},
    {"match": "blocks.0.attn.c_k.weight", "method": "ecsq"},
    {"match": "blocks.0.attn.c_v.weight", "method": "trellis", "coding": "split"},
    {"match": "blocks.0.mlp.fc.weight", "method": "trellis"},
    {"match": "blocks.0.mlp.proj.weight", "method": "gptq", "bits": 5},
    {"match": "blocks.1.attn.c_q.weight", "method": "fp16"},
    {"match": "tok_emb.weight", "row_bits": "25%:8,rest:4", "lqer_rank": 2},
]


@dataclass
class Base:
    blob: bytes
    manifest: dict
    payloads: list[bytes]
    decoded: dict[str, torch.Tensor]

    def m(self) -> dict:
        return copy.deepcopy(self.manifest)

    def __repr__(self) -> str:  # hypothesis prints the fixtures of a failing example
        return f"Base({len(self.blob)} bytes, {len(self.manifest['tensors'])} tensors)"


@pytest.fixture(scope="module")
def base() -> Base:
    sd = make_state_dict(seed=3, layers=2, dim=32, vocab=64)
    rng = np.random.default_rng(0)
    hess = {}
    for k, v in sd.items():
        if v.dim() == 2 and v.shape[0] > 2:
            x = rng.standard_normal((96, v.shape[1])).astype(np.float32)
            hess[k] = x.T @ x
    qm = quantize_tensors(sd, Recipe(rules=RULES, min_numel=256), hess)
    blob = pack_model(qm, codec="auto-fast").blob
    manifest, payload = read_container(blob)
    payloads = [bytes(payload[g["offset"]:g["offset"] + g["length"]]) for g in manifest["groups"]]
    return Base(blob, manifest, payloads, dequantize_model(unpack_model(blob)[0]))


def serialise(manifest: dict | bytes, payload: bytes) -> bytes:
    """A container around ``manifest`` (JSON object, or exact JSON text) as-is: no field repaired."""
    text = manifest if isinstance(manifest, bytes) else json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    man = brotli.compress(text, quality=5)
    return _HEAD.pack(MAGIC, FORMAT_VERSION, len(man), crc32(man)) + man + payload


def tensor(m: dict, scheme: str | None = None, name: str | None = None) -> dict:
    return next(t for t in m["tensors"] if (scheme is None or t["scheme"] == scheme) and (name is None or t["name"] == name))


def group_of(m: dict, t: dict, stream: str) -> dict:
    return m["groups"][t["streams"][stream]["group"]]


def _zeros(process, finish, n: int) -> bytes:
    """``n`` zero bytes through an incremental compressor, a MiB at a time (never ``n`` in memory)."""
    chunk = b"\0" * (1 << 20)
    return b"".join([process(chunk) for _ in range(n >> 20)] + [finish()])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """Small payloads that inflate to ``BOMB`` bytes (lzma to a quarter: it is slow to build)."""
    b = brotli.Compressor(quality=5)
    out = {"brotli": _zeros(b.process, b.finish, BOMB)}
    if _bounded_codecs():
        z = zstandard.ZstdCompressor(level=3).compressobj(size=BOMB)  # the frame header says 1 GiB, truthfully
        x = lzma.LZMACompressor(format=lzma.FORMAT_ALONE, preset=1)
        out["zstd"] = _zeros(z.compress, z.flush, BOMB)
        out["lzma"] = _zeros(x.compress, x.flush, BOMB // 4)
    return out


def _bounded_codecs() -> bool:
    """Whether the codecs enforce an output limit while decompressing (the pack layer's part of
    the hostile-input work); payload bombs can only be refused early once they do."""
    return "max_out" in inspect.signature(codecs.decompress).parameters


ALL = ("unpack", "verify-roundtrip", "inspect")
DECODING = ("unpack", "verify-roundtrip")


def crafted_corpus(base: Base, bombs: dict[str, bytes]) -> list[tuple[str, bytes, str, tuple[str, ...]]]:
    """(case, artifact bytes, text the error must contain, commands that must fail)."""
    cases = []
    payload = b"".join(base.payloads)

    def edit(name: str, fn, expect: str, commands=ALL, raw: bool = False):
        m = base.m()
        fn(m)
        blob = serialise(m, payload) if raw else write_container(m, list(base.payloads))
        cases.append((name, blob, expect, commands))

    def setter(path, value):
        def fn(m):
            o = m
            for k in path[:-1]:
                o = o[k]
            o[path[-1]] = value
        return fn

    intk = lambda m: tensor(m, "intk")  # noqa: E731
    # --- shapes the streams do not fill --------------------------------------------------------
    edit("shape/stream mismatch", lambda m: intk(m).__setitem__("shape", [intk(m)["shape"][0], 33]), "needs")
    edit("broadcast: ecsq rows x huge", lambda m: tensor(m, "ecsq").__setitem__("shape", [16, 2**24]), "stream q has shape")
    edit("broadcast: intk 1 x everything", lambda m: intk(m).__setitem__("shape", [1, math.prod(intk(m)["shape"]) * intk(m)["shape"][0]]), "needs")
    edit("claims 4 TB", lambda m: tensor(m, "float").__setitem__("shape", [2**20, 2**20]), "would decode to")
    edit("stream shape edited", lambda m: tensor(m, "dq")["streams"]["scale"].__setitem__("shape", [2**30]), "needs")
    edit("stream claims 8 GiB", lambda m: tensor(m, "dq")["streams"]["scale"].__setitem__("shape", [2**32]), "would decode to")
    edit("huge hadamard plan", lambda m: tensor(m, "e8p")["params"].__setitem__("row_blocks", [[12008, 1]]), "rotation plan")
    edit("e8p codebook v2", lambda m: tensor(m, "e8p")["params"].__setitem__("codebook_version", 2), "codebook")
    edit("e8p pad_cols", lambda m: tensor(m, "e8p")["params"].__setitem__("pad_cols", 3), "pad_cols")
    edit("intk bits out of range", lambda m: intk(m)["params"].__setitem__("bits", 17), "bits")
    edit("intk symbol range", lambda m: intk(m)["streams"]["q"].__setitem__("hi", 40), "symbol range")
    edit("trellis 8 states", lambda m: tensor(m, "dq")["params"].__setitem__("states", 8), "states")
    edit("introws tier rows", lambda m: tensor(m, "introws")["params"]["tiers"][0].__setitem__("rows", 1), "q.t0")
    edit("lqer group", lambda m: tensor(m, "introws")["params"]["lqer"].__setitem__("group", 1), "lqer.s")
    edit("lqer dropped, streams left", lambda m: tensor(m, "introws")["params"].pop("lqer"), "does not use")
    edit("float stored as other dtype", lambda m: tensor(m, "float")["params"].__setitem__("stored", "float16"), "dtype")
    edit("unknown tensor dtype", lambda m: intk(m).__setitem__("dtype", "complex64"), "dtype")
    edit("e8p rotation plan missing", lambda m: tensor(m, "e8p")["params"].pop("col_blocks"), "col_blocks")
    edit("e8p scale mode", lambda m: tensor(m, "e8p")["params"].__setitem__("scale_mode", "column"), "scale_mode")
    edit("trellis coding", lambda m: tensor(m, "dq")["params"].__setitem__("coding", "zigzag"), "coding")
    edit("column exponents out of range", lambda m: tensor(m, "ecsq")["streams"]["colexp"].__setitem__("hi", 100), "colexp")
    edit("tier map none with two tiers", lambda m: tensor(m, "introws")["params"].__setitem__("tier_map", "none"), "tier map")
    edit("lqer rank past the matrix", lambda m: tensor(m, "introws")["params"]["lqer"].__setitem__("rank", 10**6), "rank")
    edit("float data 2-D", lambda m: tensor(m, "float")["streams"]["data"].__setitem__("shape", [1, tensor(m, "float")["streams"]["data"]["shape"][0]]), "data")
    edit("negative dimension", lambda m: intk(m).__setitem__("shape", [-64, -32]), "shape")
    # --- references, names, kinds ---------------------------------------------------------------
    edit("negative offset", lambda m: m["groups"][1].__setitem__("offset", -5), "offset", raw=True)
    edit("overlapping offsets", lambda m: m["groups"][1].__setitem__("offset", 0), "offset", raw=True)
    edit("length past the end", lambda m: m["groups"][-1].__setitem__("length", 10**9), "truncated", raw=True)

    def dup(m):
        m["tensors"][1]["name"] = m["tensors"][0]["name"]
    edit("duplicate tensor names", dup, "used twice")

    def swap_index(m):
        t = intk(m)
        g = t["streams"]["q"]["group"]
        other = next(s for u in m["tensors"] if u is not t for s in u["streams"].values() if s["group"] == g)
        t["streams"]["q"]["index"], other["index"] = other["index"], t["streams"]["q"]["index"]
    edit("two tensors trade streams", swap_index, "points at")

    def shared(m):
        t = intk(m)
        g = t["streams"]["q"]["group"]
        other = next(s for u in m["tensors"] if u is not t for s in u["streams"].values() if s["group"] == g)
        other["index"] = t["streams"]["q"]["index"]
    edit("stream referenced twice", shared, "points at")
    edit("group out of range", lambda m: intk(m)["streams"]["q"].__setitem__("group", 999), "group")
    edit("raw_bytes lies", lambda m: group_of(m, intk(m), "q").__setitem__("raw_bytes", 1), "raw_bytes")
    edit("unknown group kind", lambda m: m["groups"][0].__setitem__("kind", "weights"), "kind")
    edit("unknown scheme", lambda m: intk(m).__setitem__("scheme", "intk2"), "unknown scheme")
    edit("unknown codec", lambda m: m["groups"][0].__setitem__("codec", "gzip"), "codec")
    edit("unknown entropy model", lambda m: next(g for g in m["groups"] if g["codec"] == "entropy").__setitem__("model", "magic"), "model")
    edit("malformed layout", lambda m: next(g for g in m["groups"] if "layout" in g).__setitem__("layout", {"order": "diag"}), "layout")
    edit("stream kind flipped", lambda m: intk(m)["streams"]["scale"].__setitem__("kind", "symbols"), "scale")
    edit("stream lo above hi", lambda m: intk(m)["streams"]["q"].__setitem__("lo", 50), "hi")
    edit("group renamed", lambda m: m["groups"][0].__setitem__("name", "mlp.fc.weight:q:|i1"), "groups")
    edit("empty tensor name", lambda m: intk(m).__setitem__("name", ""), "name")
    edit("codec_params not an object", lambda m: m["groups"][0].__setitem__("codec_params", "fast"), "codec_params")
    edit("shuffle not a bool", lambda m: next(g for g in m["groups"] if g["kind"] == "side").__setitem__("shuffle", "yes"), "shuffle")
    edit("side group coded with entropy", lambda m: next(g for g in m["groups"] if g["kind"] == "side").__setitem__("codec", "entropy"), "codec")
    edit("unknown top-level field", setter(["extra"], 1), "unknown field")
    edit("unknown grouping", setter(["grouping"], "by-color"), "grouping")
    edit("format 2", setter(["format"], 2), "format")
    edit("group order swapped", lambda m: m["groups"].insert(0, m["groups"].pop(1)), "groups")
    # --- malformed JSON structure ----------------------------------------------------------------
    edit("empty manifest", lambda m: m.clear(), "missing", raw=True)
    edit("no tensors", lambda m: m.update(tensors=[], groups=[]), "no tensors", raw=True)
    edit("missing tensor key", lambda m: intk(m).pop("shape"), "missing")
    edit("missing group key", lambda m: m["groups"][0].pop("raw_bytes"), "missing", raw=True)
    edit("wrong type: shape string", lambda m: intk(m).__setitem__("shape", "64x32"), "shape")
    edit("wrong type: lo string", lambda m: intk(m)["streams"]["q"].__setitem__("lo", "-31"), "lo")
    edit("wrong type: params list", lambda m: intk(m).__setitem__("params", [6]), "params")
    edit("wrong type: streams list", lambda m: intk(m).__setitem__("streams", []), "streams")
    edit("wrong type: tensors object", lambda m: m.__setitem__("tensors", {}), "lists", raw=True)
    edit("bool as int", lambda m: intk(m)["params"].__setitem__("bits", True), "bits")
    edit("float as int", lambda m: intk(m)["streams"]["q"].__setitem__("index", 0.0), "index")
    edit("huge int", lambda m: intk(m).__setitem__("shape", [10**30, 1]), "shape")
    edit("nesting just past the limit", lambda m: m["meta"].__setitem__("x", json.loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)), "nests")
    text = json.dumps(base.manifest, sort_keys=True).encode()
    cases.append(("deep nesting (RecursionError)", serialise(text[:-1] + b',"deep":' + b"[" * 200000 + b"]" * 200000 + b"}", payload),
                  "nests", ALL))
    cases.append(("NaN in JSON", serialise(text.replace(b'"format": 1', b'"format": NaN'), payload), "JSON", ALL))
    cases.append(("duplicate JSON keys", serialise(text.replace(b'"format": 1', b'"format": 1, "format": 1'), payload), "duplicate", ALL))
    cases.append(("not JSON", serialise(b"\xff\xfe not json", payload), "JSON", ALL))
    cases.append(("JSON list", serialise(b"[1, 2, 3]", payload), "object", ALL))
    cases.append(("JSON string", serialise(b'"PGPK"', payload), "object", ALL))
    cases.append(("empty brotli stream", _bomb_container(b"", payload), "manifest", ALL))

    # --- bombs -----------------------------------------------------------------------------------
    cases.append(("manifest bomb (1 GiB of zeros)", _bomb_container(bombs["brotli"], payload), f"more than {MAX_MANIFEST_BYTES:,}", ALL))
    # The 452-byte artifact of the issue: q (rows × 1) and column exponents (cols) broadcast to
    # rows × cols = 1 GB in the old dequantizer.
    amp = QuantizedTensor("w", (16000, 16000), "float32", "ecsq", {"method": "ecsq"}, {
        "q": Stream(np.zeros((16000, 1), np.int16), "symbols", 0, 0),
        "scale": Stream(np.zeros(16000, np.float16), "side"),
        "colexp": Stream(np.zeros(16000, np.int8), "symbols", 0, 0)})
    cases.append(("broadcast amplification (hand-packed)", pack_model(QuantizedModel([amp]), codec="brotli").blob, "stream q has shape", ALL))
    if _bounded_codecs():
        for codec in ("brotli", "zstd", "lzma"):
            bomb = bombs[codec]
            def payload_bomb(m, codec=codec):
                g = next(g for g in m["groups"] if g["kind"] == "side")
                g["codec"] = codec
                g["codec_params"] = codecs.codec_params(codec)
            m = base.m()
            payload_bomb(m)
            gi = next(i for i, g in enumerate(m["groups"]) if g["kind"] == "side")
            cases.append((f"payload bomb ({codec})", write_container(m, [bomb if i == gi else p for i, p in enumerate(base.payloads)]),
                          m["groups"][gi]["name"], DECODING))
    return cases


def _bomb_container(compressed_manifest: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(MAGIC, FORMAT_VERSION, len(compressed_manifest), crc32(compressed_manifest)) + compressed_manifest + payload


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _run_child(tmp_path: Path, cases: list[tuple[str, bytes, str, tuple[str, ...]]]) -> list[dict]:
    spec = []
    for i, (name, blob, _, _) in enumerate(cases):
        p = tmp_path / f"case{i:02d}.pgp"
        p.write_bytes(blob)
        # Every command on every case: those a case need not fail must then succeed.
        spec.append({"name": name, "path": str(p), "commands": list(ALL)})
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    # One thread per pool and two malloc arenas keep the address space the same on any core count.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    env.pop(ENV_MAX_DECODED, None)
    r = subprocess.run([sys.executable, str(HERE / "hostile_runner.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                       env=env, capture_output=True, text=True, timeout=600, preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def test_crafted_corpus_is_refused_under_a_memory_limit(tmp_path, base, bombs):
    cases = crafted_corpus(base, bombs)
    good = tmp_path / "good.pgp"
    good.write_bytes(base.blob)
    # The same child, the same limit: the untouched artifact must go through every command, so
    # the limit is known not to be what refuses the crafted ones.
    results = _run_child(tmp_path, [("untouched", base.blob, "", ALL)] + cases)
    assert len(results) == len(cases) + 1
    ok = results[0]
    assert ok["api"] == "ok", ok
    for cmd, r in ok["cli"].items():
        assert r["exit"] == 0 and r["exception"] is None, (cmd, r)
    failures = []
    for (name, _, expect, commands), res in zip(cases, results[1:]):
        problems = []
        if not res["api"].startswith("ArtifactError: ") or expect.lower() not in res["api"].lower():
            problems.append(f"api: {res['api'][:300]}")
        for cmd in ALL:
            r = res["cli"][cmd]
            lines = [ln for ln in r["output"].splitlines() if ln.strip()]
            if cmd not in commands:
                if r["exit"] != 0 or r["exception"]:
                    problems.append(f"{cmd} should list the manifest: {r}")
                continue
            if r["exit"] != 1 or r["exception"] or len(lines) != 1 or not lines[0].startswith("error: "):
                problems.append(f"{cmd}: exit {r['exit']} {r['exception']} {r['output'][:300]!r}")
            elif "memory" in lines[0].lower():
                problems.append(f"{cmd} hit the memory limit: {lines[0]}")
        if res["wrote_output"]:
            problems.append("unpack wrote an output file")
        if res["rss_growth_mb"] > RSS_GROWTH_LIMIT_MB:
            problems.append(f"peak RSS grew by {res['rss_growth_mb']:.0f} MB")
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)
    print(f"{len(cases)} crafted artifacts, all refused")


@pytest.mark.skipif(not _bounded_codecs(), reason="payload bombs are refused once every codec decodes with max_out")
def test_payload_bombs_are_in_the_corpus(base, bombs):
    names = [c[0] for c in crafted_corpus(base, bombs)]
    assert {"payload bomb (brotli)", "payload bomb (zstd)", "payload bomb (lzma)"} <= set(names)


def test_real_process_prints_one_line(tmp_path, base):
    """The corpus runs through typer's runner; here two cases go through a real interpreter, so
    what reaches the terminal (no traceback, one line, exit 1) is what a user sees."""
    m = base.m()
    tensor(m, "ecsq")["shape"] = [16, 2**24]
    p = tmp_path / "amp.pgp"
    p.write_bytes(write_container(m, list(base.payloads)))
    q = tmp_path / "deep.pgp"
    q.write_bytes(serialise(b"[" * 100000 + b"]" * 100000, b""))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    code = "import sys; sys.argv[0] = 'pgolf-pack'; from pgolf_pack.cli import main; main()"
    for art, args in ((p, ["unpack", str(p), "-o", str(tmp_path / "o.safetensors")]), (q, ["inspect", str(q)])):
        r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120,
                           preexec_fn=_limit_memory)
        assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert not (tmp_path / "o.safetensors").exists()


# --- the decoded-bytes ceiling -------------------------------------------------------------------


@pytest.fixture(scope="module")
def zeros_artifact() -> bytes:
    """A real model of 4 Mi float32 zeros (16 MiB decoded) in a few hundred bytes."""
    t = QuantizedTensor("z", (1024, 4096), "float32", "float", {"stored": "float32"},
                        {"data": Stream(np.zeros(1 << 22, np.float32), "side")})
    return pack_model(QuantizedModel([t]), codec="brotli").blob


def test_ceiling_argument_and_environment(zeros_artifact, monkeypatch, tmp_path):
    assert len(zeros_artifact) < 2000
    qm, _ = unpack_model(zeros_artifact)  # the default ceiling lets a real 16 MiB model through
    assert qm.tensors[0].streams["data"].data.shape == (1 << 22,)
    with pytest.raises(ArtifactError, match="over the limit of 1,000,000"):
        unpack_model(zeros_artifact, max_decoded_bytes=1_000_000)
    with pytest.raises(PgolfError, match="positive"):
        unpack_model(zeros_artifact, max_decoded_bytes=0)
    p = tmp_path / "z.pgp"
    p.write_bytes(zeros_artifact)
    monkeypatch.setenv(ENV_MAX_DECODED, "1000000")
    with pytest.raises(ArtifactError, match=ENV_MAX_DECODED):
        read_container(zeros_artifact)
    r = CliRunner().invoke(app, ["unpack", str(p), "-o", str(tmp_path / "z.safetensors")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    monkeypatch.setenv(ENV_MAX_DECODED, "lots")
    r = CliRunner().invoke(app, ["inspect", str(p)])
    assert r.exit_code == 1 and f"error: {ENV_MAX_DECODED} must be a positive number" in r.output, r.output
    monkeypatch.setenv(ENV_MAX_DECODED, str(64 << 20))
    assert unpack_model(zeros_artifact)[0].tensors[0].shape == (1024, 4096)


# --- decoding order: every CRC before any decoder, stop at the first failure ---------------------


def test_payload_checksums_are_checked_before_any_decoding(base, monkeypatch):
    from pgolf_pack.pack import packer

    calls = []
    real = packer.decode_group
    monkeypatch.setattr(packer, "decode_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = base.m()
    payloads = list(base.payloads)
    last = len(payloads) - 1
    payloads[last] = bytes([payloads[last][0] ^ 1]) + payloads[last][1:]
    blob = serialise(m, b"".join(payloads))  # the manifest still holds the old payload CRC
    with pytest.raises(ArtifactError, match=f"group {m['groups'][last]['name']} is corrupted"):
        unpack_model(blob)
    assert calls == []  # the last group's bad CRC stopped everything before the first decode


def test_first_decode_failure_cancels_the_queue(base, monkeypatch):
    from pgolf_pack.pack import packer

    m = base.m()
    m["groups"][0]["raw_crc32"] ^= 1  # decodes fine, then fails its decoded-data checksum
    blob = write_container(m, list(base.payloads))
    started = []
    real = packer.decode_group
    monkeypatch.setattr(packer, "decode_group", lambda *a, **k: started.append(1) or real(*a, **k))
    with pytest.raises(ArtifactError, match="decoded to wrong data"):
        unpack_model(blob, workers=1)
    assert len(started) == 1 < len(m["groups"])


# --- normal artifacts are untouched --------------------------------------------------------------


@pytest.mark.parametrize("grouping,codecs_", [("role", ("entropy", "brotli", "zstd", "lzma", "raw")), ("tensor", ("entropy",)),
                                              ("single", ("brotli",))])
def test_every_grouping_and_codec_validates_and_roundtrips(base, grouping, codecs_):
    qm, man = unpack_model(base.blob)
    for codec in codecs_:
        res = pack_model(qm, codec=codec, grouping=grouping)
        qm2, man2 = unpack_model(res.blob)
        assert pack_model(qm2, choices=group_choices(man2), grouping=grouping).blob == res.blob
        for t, t2 in zip(qm.tensors, qm2.tensors):
            assert torch.equal(dequantize_tensor(t), dequantize_tensor(t2)), t.name


def test_dequantize_refuses_a_hand_made_broadcast():
    """The guard on the API path: a QuantizedTensor built by hand, never packed, never validated."""
    qt = QuantizedTensor("w", (4096, 4096), "float32", "ecsq", {}, {
        "q": Stream(np.zeros((4096, 1), np.int16), "symbols", 0, 0),
        "scale": Stream(np.zeros(4096, np.float16), "side"),
        "colexp": Stream(np.zeros(4096, np.int8), "symbols", 0, 0)})
    with pytest.raises(ArtifactError, match="tensor w: stream q has shape"):
        dequantize_tensor(qt)


# --- random edits: no traceback, no silent change -----------------------------------------------


def _paths(o, prefix=()):
    yield prefix
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _paths(v, prefix + (i,))


def _free(path: tuple, manifest: dict) -> bool:
    """Fields with no redundancy to check them against: an edit there is a different valid model
    (a renamed tensor, another restored dtype, other RHT signs, another float-tensor shape of the
    same size, a tier map read in its other encoding), not a manifest that lies."""
    if path[:1] == ("meta",) or (path[:1] == ("groups",) and "codec_params" in path):
        return True
    if path[:1] != ("tensors",) or len(path) < 3:
        return False
    t = manifest["tensors"][path[1]]
    field = path[2:]
    return (field in (("name",), ("dtype",), ("params", "seed"), ("params", "tier_map"), ("params", "lqer", "group"))
            or (field[:1] == ("shape",) and t["scheme"] == "float"))


_VALUES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=6), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 2, 7, 8, 255, 256, 2**15, 2**31, -(2**31) - 1, 2**40, 2**63, 10**20]),
    st.integers(-300, 70000), st.just([]), st.just({}), st.just([0, 0]), st.just({"a": 1}),
)


def _edit(m: dict, data) -> tuple | None:
    """One random edit in place: a value replaced (other type or number), nudged, or deleted.
    Returns its path, or None when it changed nothing."""
    paths = [p for p in _paths(m) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    old = parent[path[-1]]
    how = data.draw(st.sampled_from(["replace", "nudge", "delete"] if isinstance(parent, dict) else ["replace", "nudge"]), label="how")
    if how == "delete":
        del parent[path[-1]]
        return path
    if how == "nudge" and isinstance(old, int) and not isinstance(old, bool):
        parent[path[-1]] = old + data.draw(st.sampled_from([-1, 1, 2, -2, 8]), label="delta")
    else:
        parent[path[-1]] = data.draw(_VALUES, label="value")
    new = parent[path[-1]]
    return None if new == old and type(new) is type(old) else path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_random_manifest_edits_never_traceback_or_change_tensors_silently(base, data):
    """One to three edits; either a one-line refusal (PgolfError), or tensors identical to the
    original's, or (an edit in a field nothing can check) tensors as the edited manifest says."""
    m = base.m()
    paths = []
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths.append(_edit(m, data))
    paths = [p for p in paths if p is not None]
    if not paths:
        return
    blob = serialise(m, b"".join(base.payloads))
    try:
        qm, _ = unpack_model(blob, max_decoded_bytes=64 << 20)
        out = [(t.name, dequantize_tensor(t)) for t in qm.tensors]
    except PgolfError:
        return  # refused with a one-line message
    if any(_free(p, base.manifest) for p in paths):
        for (name, w), t in zip(out, m["tensors"]):
            assert list(w.shape) == t["shape"] and name == t["name"]
        return
    assert [n for n, _ in out] == list(base.decoded), f"edits at {paths} accepted with other tensor names"
    for name, w in out:
        ref = base.decoded[name]
        assert w.dtype == ref.dtype and w.shape == ref.shape and torch.equal(w, ref), f"edits at {paths} changed {name} silently"
