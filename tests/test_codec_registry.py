"""The codec registry drives the packer; decoding is bounded; the entropy decoder stands alone.

Run: python -m pytest -q tests/test_codec_registry.py
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pgolf_pack.errors import ArtifactError, PgolfError
from pgolf_pack.pack import codecs, packer
from pgolf_pack.pack.container import group_payload, read_container
from pgolf_pack.pack.packer import CODEC_CHOICES, decode_group, group_choices, pack_model, unpack_model
from pgolf_pack.quant.base import QuantizedModel, QuantizedTensor, Stream

HAS_LRZIP = shutil.which("lrzip") is not None
needs_lrzip = pytest.mark.skipif(not HAS_LRZIP, reason="lrzip binary not installed")
PACK = Path(__file__).resolve().parents[1] / "pgolf_pack" / "pack"
CODING = PACK.parent / "coding"


def _model(q: np.ndarray, scale_rows: int | None = None) -> QuantizedModel:
    rows = q.shape[0] if scale_rows is None else scale_rows
    scale = (np.arange(rows, dtype=np.float32) % 97 + 1).astype(np.float16)
    t = QuantizedTensor("blocks.0.w", tuple(q.shape), "float32", "intk", {"bits": 6},
                        {"q": Stream(q, "symbols", -31, 31), "scale": Stream(scale, "side", 0, 0)})
    return QuantizedModel([t], {})


def _roundtrip(qm: QuantizedModel, codec: str) -> bytes:
    blob = pack_model(qm, codec=codec).blob
    back, manifest = unpack_model(blob)
    for a, b in zip(qm.tensors, back.tensors):
        for name, s in a.streams.items():
            assert b.streams[name].data.dtype == s.data.dtype
            np.testing.assert_array_equal(b.streams[name].data, s.data)
    assert pack_model(back, codec=codec, choices=group_choices(manifest)).blob == blob
    return blob


# --- one registry -----------------------------------------------------------------------------------


def test_codec_choices_come_from_the_registry():
    assert CODEC_CHOICES == ("auto", "auto-fast") + tuple(codecs.CODECS)
    assert codecs.byte_codecs() == [n for n, c in codecs.CODECS.items() if c.takes == "bytes"]
    assert "entropy" not in codecs.byte_codecs()
    # The entropy coder's manifest entry names its coder library (and no "codec" key: format 1).
    assert set(codecs.codec_params("entropy")) == {"coder", "constriction"}
    with pytest.raises(PgolfError, match="codes symbol arrays"):
        codecs.compress("entropy", b"abc")


def test_adding_a_codec_is_one_registration(monkeypatch):
    def decode(data: bytes, max_out: int) -> bytes:
        if len(data) > max_out:
            raise ArtifactError("rev payload is too long")
        return data[::-1]

    rev = codecs.Codec("rev", "bytes", lambda d: d[::-1], decode, lambda: {"codec": "rev", "version": 1},
                       lambda: True)
    monkeypatch.setitem(codecs.CODECS, "rev", rev)
    q = np.random.default_rng(0).integers(-31, 32, (40, 24)).astype(np.int8)
    blob = _roundtrip(_model(q), "rev")
    _, manifest = unpack_model(blob)
    assert {g["codec"] for g in manifest["groups"]} == {"rev"}
    assert all(g["codec_params"] == {"codec": "rev", "version": 1} for g in manifest["groups"])
    # Not flagged for auto: auto never tries it.
    _, manifest = unpack_model(pack_model(_model(q), codec="auto-fast").blob)
    assert "rev" not in {g["codec"] for g in manifest["groups"]}


def test_entropy_records_its_model_and_side_groups_use_byte_codecs():
    q = np.clip(np.rint(np.random.default_rng(1).normal(0, 5, (64, 48))), -31, 31).astype(np.int8)
    blob = _roundtrip(_model(q), "entropy")
    _, manifest = unpack_model(blob)
    sym = [g for g in manifest["groups"] if g["kind"] == "symbols"]
    side = [g for g in manifest["groups"] if g["kind"] == "side"]
    assert [g["codec"] for g in sym] == ["entropy"] and sym[0]["model"] in ("hist", "col", "row", "rc", "ref")
    assert side and all(g["codec"] in ("brotli", "zstd", "lzma") for g in side)


def test_entropy_decoder_imports_no_encoder_code():
    # The decoder side of the seam (a standalone decoder is cut from these two modules).
    allowed = {"__future__", "struct", "zlib", "math", "dataclasses", "typing", "numpy", "constriction"}
    for name in ("entropy_decode.py", "entropy_tables.py"):
        tree = ast.parse((CODING / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in allowed, (name, node.module)
                else:
                    assert (node.level, node.module) in {(2, "errors"), (1, "entropy_tables")}, (name, node.module)
    code = ("import sys, pgolf_pack.coding.entropy_decode; "
            "print(sorted(m for m in sys.modules if m.startswith('pgolf_pack')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(PACK.parents[1])}).stdout
    assert eval(out) == ["pgolf_pack", "pgolf_pack.coding", "pgolf_pack.coding.entropy_decode",
                         "pgolf_pack.coding.entropy_tables", "pgolf_pack.errors"]


# --- bounded decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["brotli", "zstd", "lzma", "raw"])
def test_byte_codecs_stop_at_max_out(codec):
    data = bytes(4_000_000)
    packed = codecs.compress(codec, data)
    assert codecs.decompress(codec, packed, len(data)) == data
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match=f"{codec} payload inflates past the 1000 bytes"):
            codecs.decompress(codec, packed, 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A bomb is stopped near the limit, never inflated whole (raw only holds its input; lzma's
    # decoder holds its 64 MiB dictionary whatever the output).
    assert peak < {"raw": len(data) + 100_000, "lzma": (1 << 26) + 1_200_000}.get(codec, 1_200_000)
    with pytest.raises(ArtifactError, match="inflates past"):
        codecs.decompress(codec, packed, len(data) - 1)


def test_lzma_refuses_a_header_that_claims_a_huge_dictionary():
    packed = bytearray(codecs.compress("lzma", bytes(1000)))
    packed[1:5] = (1 << 31).to_bytes(4, "little")  # the .lzma header's dictionary size
    with pytest.raises(ArtifactError, match="lzma payload is corrupted"):
        codecs.decompress("lzma", bytes(packed), 1000)


@needs_lrzip
def test_lrzip_refuses_a_claimed_or_real_size_over_max_out():
    data = bytes(300_000)
    packed = codecs.compress("lrzip-lzma", data)
    assert codecs.decompress("lrzip-lzma", packed, len(data)) == data
    with pytest.raises(ArtifactError, match="lrzip payload inflates past"):
        codecs.decompress("lrzip-lzma", packed, 1000)
    # A header that under-states the size: lrzip writes it all anyway, the output size is checked.
    lie = bytearray(packed)
    lie[6:14] = (100).to_bytes(8, "little")
    with pytest.raises(ArtifactError, match="lrzip"):
        codecs.decompress("lrzip-lzma", bytes(lie), 1000)


@needs_lrzip
def test_interrupted_lrzip_leaves_no_process_or_temp_dir(monkeypatch, tmp_path):
    seen = {}

    def interrupted(proc, dst, action, max_out):
        seen["pid"] = proc.pid
        raise KeyboardInterrupt

    monkeypatch.setattr(codecs, "_wait_lrzip", interrupted)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        codecs.compress("lrzip", bytes(range(256)) * 400)
    with pytest.raises(ProcessLookupError):
        os.killpg(seen["pid"], 0)
    assert not list(tmp_path.glob("pgolf-lrzip-*"))


def test_a_group_that_inflates_past_its_shapes_is_an_artifact_error():
    q = np.random.default_rng(2).integers(-31, 32, (30, 20)).astype(np.int8)
    for codec in ("zstd", "lzma", "brotli"):
        blob = pack_model(_model(q), codec=codec).blob
        manifest, area = read_container(blob)
        g = manifest["groups"][0]
        # The group's payload decoded against a smaller tensor: it holds more than it may.
        with pytest.raises(ArtifactError, match=f"{codec} payload inflates past"):
            decode_group(g, group_payload(g, area), "symbols", [(10, 20)], ["|i1"], g["lo"], g["hi"])


# --- more than 65,536 rows --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_vocab():
    # 70,000 rows of 8 columns, shaped like an embedding: codes of a few distinct row patterns.
    rng = np.random.default_rng(5)
    base = np.clip(np.rint(rng.normal(0, 6, (64, 8))), -31, 31).astype(np.int8)
    return base[rng.integers(0, 64, 70_000)]


@pytest.mark.parametrize("codec", ["entropy", "brotli", "zstd", "lzma", "raw", "lrzip-lzma", "lrzip"])
def test_more_than_65536_rows_with_every_codec(codec, wide_vocab):
    if not codecs.available(codec):
        pytest.skip(f"{codec} not available here")
    _roundtrip(_model(wide_vocab), codec)


def test_row_sort_permutations_of_more_than_65536_rows(wide_vocab):
    # 17-bit row indices; the chain order itself is quadratic, so a given permutation stands in.
    from pgolf_pack.pack.layout import Layout, candidate_layouts, layout_decode, layout_encode
    from pgolf_pack.pack.packer import Group, decode_group, encode_group

    perm = np.random.default_rng(6).permutation(wide_vocab.shape[0])
    lay = Layout("col", rowsort=True)
    buf = layout_encode([wide_vocab], -31, lay, [perm])
    np.testing.assert_array_equal(layout_decode(buf, lay, [wide_vocab.shape], ["|i1"], -31)[0], wide_vocab)
    g = Group("w:q:|i1", "symbols", [("w", "q")], [wide_vocab], -31, 31, _orders=[perm])
    payload, desc = encode_group(g, "zstd", {"codec": "zstd", "layout": lay.to_dict()})
    back = decode_group(desc, payload, "symbols", [wide_vocab.shape], ["|i1"], -31, 31)
    np.testing.assert_array_equal(back[0], wide_vocab)
    assert all(not c.rowsort for c in candidate_layouts("|i1", -31, 31, max_rows=wide_vocab.shape[0]))


def test_entropy_decode_builds_tables_in_batches():
    # More distinct column contexts than one batch of tables: the batched decoder must agree.
    from pgolf_pack.coding import entropy_decode as dec
    from pgolf_pack.coding.entropy import entropy_encode, fit_model

    rng = np.random.default_rng(8)
    # Every column its own mean: (scale, mean) keys are nearly all distinct.
    q = np.clip(np.rint(rng.standard_normal((16, 700)) * 2 + np.linspace(-90, 90, 700)), -127, 127).astype(np.int8)
    fit = fit_model([q], -127, 127, "col")
    assert fit.weights.shape[0] > dec._TABLE_BATCH
    buf = entropy_encode([q], -127, 127, "col")
    np.testing.assert_array_equal(dec.entropy_decode(buf, [q.shape], ["|i1"], -127, 127)[0], q)


@needs_lrzip
def test_a_failed_group_stops_the_other_groups_lrzip(monkeypatch, tmp_path):
    import threading
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    started = threading.Event()
    real = codecs._wait_lrzip

    def slow(proc, dst, action, max_out):
        started.set()
        return real(proc, dst, action, max_out)

    monkeypatch.setattr(codecs, "_wait_lrzip", slow)
    big = np.random.default_rng(9).integers(-31, 32, (600, 1000)).astype(np.int8)  # ZPAQ: seconds
    calls: list[str] = []
    real_encode = packer.encode_group

    def encode(g, codec, fixed=None):
        if g.kind == "side":  # this group is interrupted while the symbol group's lrzip runs
            started.wait(30)
            raise KeyboardInterrupt
        return real_encode(g, codec, fixed)

    monkeypatch.setattr(packer, "encode_group", encode)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pack_model(_model(big), codec="lrzip", on_group=calls.append)
    # The symbol group's lrzip was killed, not waited for: no group finished.
    assert time.monotonic() - t0 < 20 and calls == []
    assert not codecs._LIVE and not list(tmp_path.glob("pgolf-lrzip-*"))


def test_a_manifest_bomb_is_refused_before_it_inflates(monkeypatch):
    import brotli

    from pgolf_pack.pack import container, manifest_check

    monkeypatch.setattr(manifest_check, "MAX_MANIFEST_BYTES", 1 << 20)
    man = brotli.compress(b"[" + b" " * (8 << 20) + b"]", quality=5)
    blob = container._HEAD.pack(container.MAGIC, container.FORMAT_VERSION, len(man), container.crc32(man)) + man
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="manifest decompresses to more than"):
            read_container(blob)
        assert tracemalloc.get_traced_memory()[1] < 3 << 20
    finally:
        tracemalloc.stop()
