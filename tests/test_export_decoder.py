"""export-decoder: the generated file decodes, with nothing of pgolf_pack, exactly what `unpack` gives.

Artifacts over every scheme (intk, per-row tiers, ECSQ, trellis, E8P + Hadamard, LQER, float and
fp16 passthrough) and codec (entropy, brotli, zstd, lzma, raw, lrzip when installed, forced byte
layouts) are built in-process; their decoders then run together in one isolated subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import cli, cli_ok, make_state_dict, one_line_error
from pgolf_pack.kernels.bitpack import pack_bits, unpack_bits, unpack_bits_np, unpacked_dtype
from pgolf_pack.kernels.shuffle import byte_shuffle, byte_unshuffle, byte_unshuffle_ref
from pgolf_pack.pack.container import read_container, write_container
from pgolf_pack.pack.layout import Layout, bits_for_range
from pgolf_pack.pack.packer import pack_model, unpack_model
from pgolf_pack.pipeline import LqerOptions, quantize_tensors
from pgolf_pack.recipe import recipe_from_dict
from pgolf_pack.ship.exporter import export_decoder
from pgolf_pack.ship.minify import minify, wrap
from pgolf_pack.verify import unpack_file

FORBIDDEN = ("pgolf_pack", "numba", "typer", "rich", "matplotlib")

# Runs in a directory outside the repository with -I (no PYTHONPATH, no cwd on sys.path); the
# package is blocked at the import machinery too, since the venv may hold an installed copy.
RUNNER = textwrap.dedent('''
    import importlib, json, sys
    class Block:
        names = set(%r)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ImportError("blocked: " + name)
    blocker = Block()
    sys.meta_path.insert(0, blocker)
    import torch
    from safetensors.torch import load_file
    sys.path.insert(0, ".")
    cases = json.load(open("cases.json"))
    out = []
    for c in sorted(cases, key=lambda c: c["entropy"]):
        blocker.names = set(%r) | (set() if c["entropy"] else {"constriction"})
        m = importlib.import_module(c["module"])
        got = m.load(c["artifact"])
        got_b = m.load(open(c["artifact"], "rb").read())
        want = load_file(c["expected"])
        # safetensors files hold names sorted; the decoder keeps the artifact's (checkpoint) order.
        same = sorted(got) == sorted(want) and list(got) == list(got_b) and all(
            got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            and torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))
            and torch.equal(got_b[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))
            for k in want)
        errors = []
        for bad in c["corrupt"]:
            try:
                m.load(bad)
                errors.append(None)
            except m.ArtifactError as e:
                errors.append(str(e))
        out.append({"module": c["module"], "same": same, "errors": errors,
                    "constriction": "constriction" in sys.modules,
                    "forbidden": sorted(n for n in sys.modules if n.split(".")[0] in %r)})
    print(json.dumps(out))
''') % (FORBIDDEN, FORBIDDEN, FORBIDDEN)

SCHEME_RECIPES = {
    "rtn": {"default": {"method": "rtn", "bits": 5, "clip": "sdclip"}},
    "rows+lqer": {"default": {"method": "rtn", "bits": 4, "clip": "absmax"},
                  "rule": [{"match": "tok_emb.weight", "row_bits": "25%:8,rest:4"},
                           {"match": "*.c_v.weight", "lqer_rank": 2}]},
    "ecsq": {"default": {"method": "ecsq", "delta": 0.4}, "passthrough": "fp16"},
    "trellis": {"default": {"method": "trellis", "delta": 0.5, "row_mode": "std"}},
    "e8p": {"default": {"method": "e8p", "rht": True}, "rule": [{"match": "*emb*", "method": "rtn", "bits": 6}]},
    "mixed": {"default": {"method": "ecsq"},
              "rule": [{"match": "*.mlp.*", "method": "e8p"}, {"match": "*.attn.*", "method": "trellis"},
                       {"match": "tok_emb.weight", "method": "rtn", "bits": 7}]},
}
CODECS = ["entropy", "brotli", "zstd", "lzma", "raw", "auto-fast"]


def _forced_layouts(manifest: dict, codec: str, order: str, rowsort: bool, mode: str) -> dict:
    """Pin every group to ``codec`` with the drawn byte layout (symbol groups) or shuffle (side)."""
    choices = {}
    for g in manifest["groups"]:
        if g["kind"] == "side":
            choices[g["name"]] = {"codec": codec, "shuffle": mode == "shuffle"}
            continue
        bp = bits_for_range(g["lo"], g["hi"]) if mode == "bitpack" else None
        lay = Layout(order, rowsort=rowsort, shuffle=mode == "shuffle", bitpack=bp if bp and bp <= 16 else None)
        choices[g["name"]] = {"codec": codec, "layout": lay.to_dict()}
    return choices


def _corruptions(blob: bytes, manifest: dict) -> list[bytes]:
    g = max(manifest["groups"], key=lambda g: g["length"])
    flip = bytearray(blob)
    flip[len(blob) - sum(x["length"] for x in manifest["groups"]) + g["offset"] + g["length"] // 2] ^= 0x10
    # A manifest that adds up but asks for terabytes: refused before anything is allocated.
    man, payload = read_container(blob)
    payloads = [bytes(payload[x["offset"]:x["offset"] + x["length"]]) for x in man["groups"]]
    t = max(man["tensors"], key=lambda t: len(t["shape"]) == 2 and t["scheme"] == "intk")
    for s in t["streams"].values():
        s["shape"] = [1 << 30] + s["shape"][1:]
    t["shape"] = [1 << 30] + t["shape"][1:]
    return [bytes(flip), blob[:-3], b"PGPK" + bytes([9]) + blob[5:], write_container(man, payloads)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    cases: list[dict] = []
    have_lrzip = shutil.which("lrzip") is not None

    @settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(scheme=st.sampled_from(sorted(SCHEME_RECIPES)), codec=st.sampled_from(CODECS), seed=st.integers(0, 3),
           dim=st.sampled_from([32, 64]), order=st.sampled_from(["row", "col"]), rowsort=st.booleans(),
           mode=st.sampled_from(["plain", "shuffle", "bitpack"]), force=st.booleans(), wrapped=st.booleans())
    def build(scheme, codec, seed, dim, order, rowsort, mode, force, wrapped):
        sd = make_state_dict(seed=seed, layers=2, dim=dim, vocab=128)
        lqer = LqerOptions(top_k=1, rank=2) if scheme == "rtn" and seed % 2 else None
        qm = quantize_tensors(sd, recipe_from_dict({"min_numel": 1024, **SCHEME_RECIPES[scheme]}), lqer=lqer)
        res = pack_model(qm, codec="zstd" if force and codec in ("entropy", "auto-fast") else codec)
        if force and codec not in ("entropy", "auto-fast"):
            res = pack_model(qm, choices=_forced_layouts(res.manifest, codec, order, rowsort, mode))
        _add(d, cases, res.blob, wrapped)

    build()
    # Every scheme at least once whatever hypothesis draws, then lrzip and a pure intk + brotli artifact.
    sd = make_state_dict(seed=9, layers=2, dim=32, vocab=128)
    for i, scheme in enumerate(sorted(SCHEME_RECIPES)):
        qm = quantize_tensors(sd, recipe_from_dict({"min_numel": 1024, **SCHEME_RECIPES[scheme]}))
        _add(d, cases, pack_model(qm, codec=CODECS[i % len(CODECS)]).blob, i % 2 == 0)
    qm = quantize_tensors(sd, recipe_from_dict({"min_numel": 1024, **SCHEME_RECIPES["rtn"]}))
    _add(d, cases, pack_model(qm, codec="brotli").blob, True, name="intk_brotli")
    if have_lrzip:
        _add(d, cases, pack_model(qm, codec="lrzip-lzma").blob, True)
    (d / "cases.json").write_text(json.dumps(cases))
    (d / "runner.py").write_text(RUNNER)
    r = subprocess.run([sys.executable, "-I", "runner.py"], cwd=d, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, cases, json.loads(r.stdout)


def _add(d, cases, blob: bytes, wrapped: bool, name: str | None = None) -> None:
    i = len(cases)
    name = name or f"case{i}"
    art = d / f"{name}.pgp"
    art.write_bytes(blob)
    unpack_file(art, d / f"{name}.safetensors")  # what `pgolf-pack unpack` writes
    dec = export_decoder(blob)
    (d / f"pgp_{name}.py").write_bytes(dec.code(wrapped))
    _, manifest = unpack_model(blob)
    bad = []
    for j, b in enumerate(_corruptions(blob, manifest)):
        (d / f"{name}.bad{j}.pgp").write_bytes(b)
        bad.append(f"{name}.bad{j}.pgp")
    cases.append({"module": f"pgp_{name}", "artifact": art.name, "expected": f"{name}.safetensors", "corrupt": bad,
                  "entropy": "entropy" in dec.codecs, "codecs": dec.codecs, "schemes": dec.schemes,
                  "imports": dec.imports})


def test_exported_decoders_match_unpack_bit_for_bit(exported):
    _, cases, results = exported
    assert len(results) == len(cases) >= 17
    assert all(r["same"] for r in results), [r["module"] for r in results if not r["same"]]
    assert all(not r["forbidden"] for r in results)
    # The draws covered every scheme and every codec.
    assert {s for c in cases for s in c["schemes"]} >= {"intk", "introws", "ecsq", "dq", "e8p", "float"}
    assert {x for c in cases for x in c["codecs"]} >= {"entropy", "brotli", "zstd", "lzma", "raw"}


def test_exported_decoders_refuse_damaged_artifacts(exported):
    _, _, results = exported
    for r in results:
        assert len(r["errors"]) == 4 and all(r["errors"]), r
        flipped, truncated, version, huge = r["errors"]
        assert "corrupted" in flipped or "checksum" in flipped
        assert "truncated" in truncated and "version 9" in version
        assert "over the limit" in huge or "implies" in huge or "expected" in huge, huge


def test_a_decoder_imports_only_the_codec_libraries_its_artifact_names(exported):
    _, cases, _ = exported
    for c in cases:
        libs = {line.split()[1].split(".")[0] for line in c["imports"]}
        assert ("constriction" in libs) == ("entropy" in c["codecs"])
        assert ("zstandard" in libs) == ("zstd" in c["codecs"])
        assert ("subprocess" in libs) == any(x.startswith("lrzip") for x in c["codecs"])
        assert "brotli" in libs and not libs & set(FORBIDDEN)


def test_an_intk_brotli_decoder_never_imports_constriction(exported):
    _, cases, results = exported
    by = {r["module"]: r for r in results}
    case = next(c for c in cases if c["module"] == "pgp_intk_brotli")
    assert case["codecs"] == ["brotli"] and not any("constriction" in i for i in case["imports"])
    assert not by["pgp_intk_brotli"]["constriction"]


def test_numpy_paths_match_the_numba_kernels():
    rng = np.random.default_rng(0)
    for bits in (1, 3, 6, 8, 11, 16, 17, 32):
        for n in (0, 1, 9, 5000):
            v = rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(unpacked_dtype(bits))
            p = pack_bits(v, bits)
            a, b = unpack_bits(p, bits, n), unpack_bits_np(p, bits, n)
            assert a.dtype == b.dtype and np.array_equal(a, b) and np.array_equal(a, v)
        with pytest.raises(ValueError, match="too short"):
            unpack_bits_np(b"\x00", bits, 9)
    for item in (1, 2, 4, 8, 3):
        buf = rng.integers(0, 256, 24 * item, dtype=np.uint8)
        s = byte_shuffle(buf, item)
        assert np.array_equal(byte_unshuffle(s, item), byte_unshuffle_ref(s, item))


def test_minify_and_wrap_keep_the_program():
    src = textwrap.dedent('''
        """Doc."""
        from __future__ import annotations
        from dataclasses import dataclass, field

        @dataclass
        class P:
            """Doc."""
            a: int = 1
            b: list[int] = field(default_factory=list)

        def f(x: int, *r: str, k: float = 2.0) -> float:
            y: float = x * k  # comment
            z: int
            return y + len(r) + P().a + len("\\0" + "\\n\\\\")
    ''')
    small = minify(src)
    assert "Doc" not in small and "comment" not in small and "float" not in small and len(small) < len(src)
    for blob in (small.encode(), bytes(range(256)) * 3):  # every byte value inside the literal
        code = small if blob == small.encode() else small + f"DATA = {blob!r}\n"
        wrapped, how = wrap(code)
        ns: dict = {"__name__": "m"}
        sys.modules["m"] = type(sys)("m")
        try:
            exec(compile(wrapped, "<w>", "exec"), ns)
        finally:
            del sys.modules["m"]
        assert ns["f"](3, "a") == 6.0 + 1 + 1 + 3 and how in ("lzma", "brotli")
        if "DATA" in ns:
            assert ns["DATA"] == blob


def test_export_decoder_cli_writes_and_reports(tmp_path, exported):
    d, cases, _ = exported
    art = d / next(c for c in cases if c["entropy"])["artifact"]
    info = cli_ok("export-decoder", art, "-o", tmp_path / "pgp_decode.py", "--json")
    assert info["bytes"] == (tmp_path / "pgp_decode.py").stat().st_size == info["wrapped"] < info["minified"] < info["raw"]
    assert "entropy" in info["codecs"] and info["form"] == "wrapped"
    out = cli_ok("export-decoder", art, "-o", tmp_path / "raw.py", "--no-minify")
    assert "readable source" in out and (tmp_path / "raw.py").stat().st_size == info["raw"]
    one_line_error(cli("export-decoder", art, "-o", art), "refusing to overwrite")


def test_example_submission_scores_through_the_exported_decoder(tmp_path):
    from conftest import EX_CKPT, EX_TOKENIZER, EXAMPLES

    val = EXAMPLES / "tiny_val_000000.bin"
    art = tmp_path / "model.pgp"
    cli_ok("quantize", EX_CKPT, "-o", art, "--codec", "entropy", "--json")
    cli_ok("export-decoder", art, "-o", tmp_path / "pgp_decode.py", "--json")
    for f in (EXAMPLES / "submission" / "train_gpt.py", val, EX_TOKENIZER):
        shutil.copy(f, tmp_path)
    # As a submission runs: its own directory, no PYTHONPATH; pgolf_pack blocked.
    run = ("import runpy, sys\nclass B:\n def find_spec(self, n, p=None, t=None):\n"
           f"  if n.split('.')[0] in {FORBIDDEN!r}: raise ImportError(n)\n"
           "sys.meta_path.insert(0, B()); sys.path.insert(0, '.')\n"
           f"sys.argv = ['train_gpt.py', '--val', {val.name!r}, '--tokenizer', {EX_TOKENIZER.name!r}, '--max-seqs', '4']\n"
           "runpy.run_path('train_gpt.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-I", "-c", run], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    bpb = float(r.stdout.split("val_bpb ")[1].split()[0])
    ref = cli_ok("eval", art, "--tokens", val, "--tokenizer", EX_TOKENIZER, "--seq-len", "256", "--max-seqs", "4", "--json")
    assert abs(bpb - ref["bpb"]) < 1e-4
    b = cli_ok("analyze", "budget", art, "--code", tmp_path / "train_gpt.py", "--json")
    assert b["decoder_bytes"] == (tmp_path / "pgp_decode.py").stat().st_size
    assert b["total_bytes"] == art.stat().st_size + b["decoder_bytes"] + b["code_bytes"] and b["fits"]
