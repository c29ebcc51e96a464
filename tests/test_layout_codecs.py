"""Byte layouts (exact roundtrips, known bytes, candidates) and byte codecs (roundtrips, errors).

Run: python -m pytest -q tests/test_layout_codecs.py
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_pack.errors import ArtifactError, PgolfError
from pgolf_pack.kernels.rowsort import l1_chain_order
from pgolf_pack.pack import codecs
from pgolf_pack.pack.layout import (
    Layout,
    candidate_layouts,
    layout_decode,
    layout_encode,
    perm_section_size,
    row_orders,
)

LAYOUT_DTYPES = ["int8", "int16", "uint16", "int32"]
HAS_LRZIP = shutil.which("lrzip") is not None
needs_lrzip = pytest.mark.skipif(not HAS_LRZIP, reason="lrzip binary not installed")


def _roundtrip(arrays, lo, layout):
    buf = layout_encode(arrays, lo, layout)
    back = layout_decode(buf, layout, [a.shape for a in arrays], [a.dtype.str for a in arrays], lo)
    assert len(back) == len(arrays)
    for a, b in zip(arrays, back):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)
    return buf


# --- layout ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_arrays=st.integers(0, 3),
    order=st.sampled_from(["row", "col"]),
    rowsort=st.booleans(),
    mode=st.sampled_from(["plain", "shuffle", "bitpack"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_layout_roundtrip(data, n_arrays, order, rowsort, mode, seed):
    rng = np.random.default_rng(seed)
    if mode == "bitpack":
        # One dtype and one [lo, lo + 2^k) range per group, as the packer produces them.
        dtype = data.draw(st.sampled_from(LAYOUT_DTYPES))
        info = np.iinfo(dtype)
        bits = data.draw(st.integers(1, min(16, 8 * info.dtype.itemsize)))
        lo = data.draw(st.integers(int(info.min), int(info.max) - (1 << bits) + 1))
        dtypes, hi = [dtype] * n_arrays, lo + (1 << bits) - 1
        layout = Layout(order, rowsort=rowsort, bitpack=bits)
    else:
        dtypes = [data.draw(st.sampled_from(LAYOUT_DTYPES)) for _ in range(n_arrays)]
        lo, hi = None, None
        layout = Layout(order, rowsort=rowsort, shuffle=mode == "shuffle")
    arrays = []
    for dt in dtypes:
        info = np.iinfo(dt)
        a_lo, a_hi = (lo, hi) if lo is not None else (int(info.min), int(info.max))
        shape = (data.draw(st.integers(0, 12)), data.draw(st.integers(0, 12)))
        arrays.append(rng.integers(a_lo, a_hi, shape, endpoint=True).astype(dt))
    _roundtrip(arrays, lo if lo is not None else 0, layout)


def test_layout_known_bytes():
    a = np.array([[1, 2], [3, 4]], np.int8)
    assert layout_encode([a], 0, Layout("row")) == bytes([1, 2, 3, 4])
    assert layout_encode([a], 0, Layout("col")) == bytes([1, 3, 2, 4])
    # lo=1 maps symbols to 0..3, packed at 2 bits LSB first: 00 01 10 11 -> 0xE4.
    assert layout_encode([a], 1, Layout("row", bitpack=2)) == bytes([0xE4])
    w = np.array([[1, 258]], np.int16)
    assert layout_encode([w], 0, Layout("row", shuffle=True)) == bytes([0x01, 0x02, 0x00, 0x01])
    assert layout_encode([w], 0, Layout("row")) == bytes([0x01, 0x00, 0x02, 0x01])


def test_layout_rowsort_stores_packed_permutation_first():
    rng = np.random.default_rng(0)
    a = rng.integers(-31, 32, (1024, 16)).astype(np.int8)
    buf = _roundtrip([a], -31, Layout("col", rowsort=True))
    # 1024 rows need 10 bits per index: 1,280 bytes instead of 2,048 as uint16.
    assert perm_section_size([a.shape], Layout("col", rowsort=True)) == 1280
    assert len(buf) == 1280 + a.size
    perm = l1_chain_order(a)
    assert buf[1280:] == np.ascontiguousarray(a[perm].T).tobytes()


def test_layout_reuses_precomputed_row_orders():
    rng = np.random.default_rng(2)
    arrays = [rng.integers(-31, 32, (30, 8)).astype(np.int8), rng.integers(-31, 32, (1, 8)).astype(np.int8)]
    orders = row_orders(arrays)
    for lay in [Layout("col", rowsort=True), Layout("row", rowsort=True, bitpack=6)]:
        assert layout_encode(arrays, -31, lay, orders) == layout_encode(arrays, -31, lay)
    with pytest.raises(ValueError, match="not a permutation"):
        layout_encode(arrays, -31, Layout("col", rowsort=True), [np.zeros(30, np.int64), orders[1]])


def test_layout_mixed_itemsizes_shuffle_per_run():
    arrays = [
        np.array([[1, -2]], np.int16),
        np.array([[3, 4]], np.int16),
        np.array([[5]], np.int8),
        np.array([[70000]], np.int32),
    ]
    buf = _roundtrip(arrays, 0, Layout("row", shuffle=True))
    int16_run = np.array([1, -2, 3, 4], "<i2").view(np.uint8).reshape(-1, 2).T.tobytes()
    assert buf[:8] == int16_run and buf[8:9] == bytes([5])


def test_layout_bitpack_rejects_symbols_outside_range():
    with pytest.raises(ValueError, match="does not fit"):
        layout_encode([np.array([[0, 9]], np.int8)], 0, Layout("row", bitpack=3))
    with pytest.raises(ValueError, match="does not fit"):
        layout_encode([np.array([[-1, 0]], np.int8)], 0, Layout("row", bitpack=3))


def test_layout_decode_rejects_wrong_length_and_bad_permutation():
    a = np.arange(12, dtype=np.int8).reshape(4, 3)
    lay = Layout("col", rowsort=True)
    buf = layout_encode([a], 0, lay)
    with pytest.raises(ArtifactError, match="expected"):
        layout_decode(buf[:-1], lay, [a.shape], ["int8"], 0)
    with pytest.raises(ArtifactError, match="expected"):
        layout_decode(buf + b"\0", lay, [a.shape], ["int8"], 0)
    # 4 rows, 2 bits each: one byte of permutation. All-zero is not a permutation.
    with pytest.raises(ArtifactError, match="permutation"):
        layout_decode(b"\0" + buf[1:], lay, [a.shape], ["int8"], 0)


def test_layout_dict_roundtrip_and_validation():
    for lay in [Layout(), Layout("col", rowsort=True), Layout("row", shuffle=True), Layout("col", bitpack=6)]:
        assert Layout.from_dict(json.loads(json.dumps(lay.to_dict()))) == lay
    assert Layout("col", rowsort=True, bitpack=6).name == "col+rowsort+bp6"
    with pytest.raises(PgolfError, match="pick one"):
        Layout(shuffle=True, bitpack=4)
    with pytest.raises(PgolfError, match="order"):
        Layout("diagonal")
    with pytest.raises(PgolfError, match="bitpack"):
        Layout(bitpack=17)
    for bad in [{"order": "row", "zigzag": True}, {"order": "row", "bitpack": 0}, {"rowsort": "yes"}, []]:
        with pytest.raises(ArtifactError, match="malformed layout"):
            Layout.from_dict(bad)


def test_candidate_layouts_by_dtype_and_range():
    int6 = candidate_layouts("int8", -31, 31)
    assert int6[0] == Layout("col", rowsort=True)
    assert Layout("col", rowsort=True, bitpack=6) in int6
    assert not any(c.shuffle for c in int6)
    wide = candidate_layouts(np.dtype("<i2"), -31, 31)
    assert Layout("col", rowsort=True, shuffle=True) in wide
    assert Layout("row", bitpack=8) in wide and Layout("row", bitpack=6) in wide
    full16 = candidate_layouts("int16", -32768, 32767)
    assert not any(c.bitpack for c in full16) and any(c.shuffle for c in full16)
    assert len(set(candidate_layouts("int32", 0, 300))) == len(candidate_layouts("int32", 0, 300))


@pytest.mark.parametrize("dtype,lo,hi", [("int8", -31, 31), ("int8", -127, 127), ("int16", -31, 31), ("uint16", 0, 1000)])
def test_every_candidate_layout_roundtrips(dtype, lo, hi):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(lo, hi, s, endpoint=True).astype(dtype) for s in [(17, 9), (1, 5), (8, 8)]]
    for lay in candidate_layouts(dtype, lo, hi):
        _roundtrip(arrays, lo, lay)


# --- codecs ----------------------------------------------------------------------------------------


def _sample_payloads():
    rng = np.random.default_rng(7)
    structured = np.clip(np.rint(rng.normal(0, 6, 3000)), -31, 31).astype(np.int8).tobytes()
    return [b"", b"x", rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(), structured]


@pytest.mark.parametrize("codec", codecs.byte_codecs())
def test_codec_roundtrip_and_determinism(codec):
    if not codecs.available(codec):
        pytest.skip(f"{codec} not available here")
    for data in _sample_payloads():
        packed = codecs.compress(codec, data)
        assert codecs.decompress(codec, packed, len(data)) == data
        assert codecs.compress(codec, data) == packed
    assert codecs.codec_params(codec)["codec"] == codec
    assert codec in codecs.available_codecs()


def test_codecs_actually_compress_and_raw_is_identity():
    data = _sample_payloads()[3]
    assert codecs.compress("raw", data) == data
    for codec in ["brotli", "zstd", "lzma"]:
        assert len(codecs.compress(codec, data)) < 0.8 * len(data)


@needs_lrzip
def test_lrzip_codes_lz4_incompressible_symbols():
    # Fine-step int6 symbols (~5 bits each) fail lrzip's LZ4 test; without -T they are stored raw.
    rng = np.random.default_rng(3)
    data = np.clip(np.rint(rng.normal(0, 8, 60_000)), -31, 31).astype(np.int8).tobytes()
    packed = codecs.compress("lrzip", data)
    assert len(packed) < 0.75 * len(data)
    assert codecs.decompress("lrzip", packed, len(data)) == data
    assert "-T" in codecs.codec_params("lrzip")["args"] and "-T" in codecs.codec_params("lrzip-lzma")["args"]
    assert "-z" in codecs.codec_params("lrzip")["args"] and "-z" not in codecs.codec_params("lrzip-lzma")["args"]


def test_missing_lrzip_is_a_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not codecs.available("lrzip")
    assert "lrzip" not in codecs.available_codecs() and "brotli" in codecs.available_codecs()
    for codec in ["lrzip", "lrzip-lzma"]:
        for call in (lambda c, d: codecs.compress(c, d), lambda c, d: codecs.decompress(c, d, 100)):
            with pytest.raises(PgolfError) as err:
                call(codec, b"abc")
            assert not isinstance(err.value, ArtifactError)
            assert str(err.value) == codecs.LRZIP_MISSING


@needs_lrzip
@pytest.mark.parametrize("codec", ["lrzip", "lrzip-lzma"])
def test_corrupted_lrzip_input_is_an_artifact_error(codec):
    data = _sample_payloads()[3] * 4
    packed = codecs.compress(codec, data)
    flipped_tail = packed[:-1] + bytes([packed[-1] ^ 1])  # lands in the stored MD5
    for bad in [packed[: len(packed) // 2], flipped_tail, b"not an lrzip file"]:
        with pytest.raises(ArtifactError, match="lrzip decompress failed") as err:
            codecs.decompress(codec, bad, len(data))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("codec", ["brotli", "zstd", "lzma"])
def test_corrupted_library_codec_input_is_an_artifact_error(codec):
    data = _sample_payloads()[3]
    packed = codecs.compress(codec, data)
    for bad in [packed[: len(packed) // 2], b"\xff" * 40]:
        with pytest.raises(ArtifactError, match=codec):
            codecs.decompress(codec, bad, len(data))


def test_unknown_codec():
    with pytest.raises(PgolfError, match="unknown codec 'gzip'"):
        codecs.compress("gzip", b"")
    with pytest.raises(PgolfError, match="unknown codec"):
        codecs.codec_params("gzip")


def _symbol_group(arr: np.ndarray):
    from pgolf_pack.pack.packer import Group

    return Group("g:q:|i1", "symbols", [("t", "q")], [arr], int(arr.min()), int(arr.max()))


def test_auto_fast_skips_hopeless_byte_codecs_but_keeps_winners():
    from pgolf_pack.pack.packer import (_SAMPLE_MARGIN, _SAMPLE_MIN, _SCREEN_MIN, _SLOW_OVER_FAST_MIN, Group, _Slice, _best_layout, _hopeless,
                                        _laid_out, encode_group)

    rng = np.random.default_rng(3)
    # Independent symbols whose spread changes from column to column: nothing for a dictionary
    # coder to find, while the entropy coder's per-column models fit exactly.
    iid = np.clip(np.round(rng.standard_normal((1100, 1024)) * np.geomspace(0.3, 10, 1024)), -31, 31).astype(np.int8)
    g = _symbol_group(iid)
    ent, desc = encode_group(g, "entropy")
    laid = _best_layout(g)[1]
    assert all(_hopeless(c, laid, len(ent)) for c in ("brotli", "zstd", "lzma"))
    # Row and column spreads over two decades in wide codes, as rate-distortion codes are: the
    # fast zstd's size of the slice alone settles it, no slow codec needs to run.
    wide = np.round(rng.standard_normal((520, 1024)) * np.geomspace(0.1, 10, 520)[:, None]
                    * rng.permutation(np.geomspace(0.1, 10, 1024))[None, :]).astype(np.int16)
    gw = Group("g:q:<i2", "symbols", [("t", "q")], [wide], int(wide.min()), int(wide.max()))
    ent_w, _ = encode_group(gw, "entropy")
    piece = _Slice(_best_layout(gw)[1])
    assert _SLOW_OVER_FAST_MIN * piece.fast > _SAMPLE_MARGIN * len(ent_w)
    assert encode_group(gw, "auto-fast")[0] == ent_w
    payload, desc = encode_group(g, "auto-fast")
    assert desc["codec"] == "entropy" and payload == ent
    # A short sequence repeated across row boundaries: a byte codec's matches win by a mile and
    # must not be skipped.
    rep = np.resize(iid.reshape(-1)[:3001], iid.size).reshape(iid.shape)
    g = _symbol_group(rep)
    ent, _ = encode_group(g, "entropy")
    payload, desc = encode_group(g, "auto-fast")
    assert desc["codec"] != "entropy" and len(payload) < len(ent) / 10
    # Small groups are never sampled: every codec runs.
    small = _symbol_group(iid[:32])
    assert not _hopeless("zstd", _best_layout(small)[1], 1)
    # A group between the screening and the sampling size is screened by zstd-3 on all of it.
    mid = _symbol_group(iid[:600])
    mid_laid = _best_layout(mid, sampled=True)[1]
    assert _SCREEN_MIN <= len(mid_laid) < _SAMPLE_MIN
    assert _hopeless("brotli", mid_laid, 1) and not _hopeless("brotli", mid_laid, 10 * len(mid_laid))
