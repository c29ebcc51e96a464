from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_pack.errors import ArtifactError, PgolfError
from pgolf_pack.quant import e8p
from pgolf_pack.quant.base import dequantize_float32, dequantize_tensor
from pgolf_pack.quant.rtn import quantize_rtn


def _in_e8(v: np.ndarray) -> np.ndarray:
    """Row-wise membership in E8 = (Z^8 ∪ (Z+1/2)^8) with even coordinate sum."""
    two = np.rint(2 * v)
    assert np.allclose(two, 2 * v)
    two = two.astype(np.int64)
    all_int = np.all(two % 2 == 0, axis=1)
    all_half = np.all(two % 2 == 1, axis=1)
    even_sum = two.sum(axis=1) % 4 == 0
    return (all_int | all_half) & even_sum


# ---------------------------------------------------------------------------------------------
# Codebook conformance (research notes §1.3, QuIP# latticee8_padded12.py)
# ---------------------------------------------------------------------------------------------


def test_abs_grid_construction():
    g = e8p.abs_grid()
    assert g.shape == (256, 8)
    assert len(np.unique(g, axis=0)) == 256
    ball = g[:227]
    assert [tuple(r) for r in ball] == sorted(tuple(r) for r in ball)
    norms = Counter(np.rint((g**2).sum(axis=1)).astype(int).tolist())
    assert norms == {2: 1, 4: 8, 6: 28, 8: 64, 10: 126, 12: 29}
    assert int((np.rint(g.sum(axis=1)).astype(int) % 2).sum()) == 149
    # The padding rows: three 1/2 and five 3/2, QuIP# order starts with 1/2 at positions 1, 2, 3.
    assert np.all((g[227:] == 0.5).sum(axis=1) == 3) and np.all((g[227:] == 1.5).sum(axis=1) == 5)
    np.testing.assert_array_equal(g[227], [1.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5])
    np.testing.assert_array_equal(g[255], [1.5, 1.5, 0.5, 0.5, 1.5, 1.5, 1.5, 0.5])


def test_packed_words_match_quip_decoder():
    assert e8p.packed_abs_words()[:4].tolist() == [0x99999999, 0x59999999, 0xD9999999, 0x7999B999]


def test_codebook_distinct_and_on_shifted_e8():
    cb = e8p.codebook()
    assert cb.shape == (65536, 8)
    assert len(np.unique(cb, axis=0)) == 65536
    base = cb - 0.25
    assert _in_e8(base).all()
    integer = np.all(np.rint(base) == base, axis=1)
    assert integer.sum() == 32768  # S - 1/4 half lands in D8, S + 1/4 half in D8 + 1/2
    assert set(np.unique(cb).tolist()) == {s * (k + 0.25) for s in (1, -1) for k in (0, 0.5, 1, 1.5, 2, 2.5)}


def test_codebook_norm_shells_and_mean():
    cb = e8p.codebook()
    shells = Counter(((cb**2).sum(axis=1)).tolist())
    assert shells == {
        0.5: 2, 1.5: 56, 2.5: 252, 3.5: 688, 4.5: 1514, 5.5: 2664, 6.5: 4396, 7.5: 7056, 8.5: 9330,
        9.5: 9980, 10.5: 11062, 11.5: 7860, 12.5: 5892, 13.5: 3252, 14.5: 1010, 15.5: 348, 16.5: 174,
    }
    assert abs((cb**2).sum(axis=1).mean() - 9.5703) < 1e-4


def test_spot_codes():
    cb = e8p.codebook()
    np.testing.assert_array_equal(cb[0], [0.75] * 8)
    np.testing.assert_array_equal(cb[1], [0.25] * 8)
    np.testing.assert_array_equal(cb[2], [-0.75, 0.25, -0.75, 0.25, 0.25, 0.25, 0.25, 0.25])
    np.testing.assert_array_equal(cb[255], [-0.25] * 8)
    np.testing.assert_array_equal(cb[256], [0.75] * 7 + [-1.25])
    np.testing.assert_array_equal(cb[65535], [-1.25, -1.25, -0.25, -0.25, -1.25, -1.25, -1.25, 0.75])


def test_parity_sign_rules():
    cb = e8p.codebook()
    codes = np.arange(65536)
    popcount_odd = np.array([bin(c & 0xFF).count("1") & 1 for c in codes], dtype=bool)
    integer_coset = np.all(np.rint(cb - 0.25) == cb - 0.25, axis=1)
    # odd popcount of the sign byte <=> shift -1/4 <=> c - 1/4 in the integer coset D8
    np.testing.assert_array_equal(popcount_odd, integer_coset)
    shift = np.where(popcount_odd, -0.25, 0.25)[:, None]
    s = cb - shift
    g = e8p.abs_grid()
    np.testing.assert_array_equal(np.abs(s), g[codes >> 8])
    # number of negative coordinates ≡ sum of the magnitude pattern (mod 2): s is in D8 + 1/2
    negs = (s < 0).sum(axis=1) % 2
    np.testing.assert_array_equal(negs, np.rint(g[codes >> 8].sum(axis=1)).astype(int) % 2)


def test_symmetry_negation_and_even_flips():
    cb = e8p.codebook()
    keys = {tuple(r) for r in (cb * 4).astype(np.int64).tolist()}
    assert {tuple(r) for r in (-cb * 4).astype(np.int64).tolist()} == keys
    # Flipping an even number of signs of the unshifted point stays in the codebook.
    popcount_odd = np.array([bin(c & 0xFF).count("1") & 1 for c in range(65536)], dtype=bool)
    shift = np.where(popcount_odd, -0.25, 0.25)[:, None]
    s = cb - shift
    for i, j in [(0, 1), (2, 7), (3, 5), (6, 7)]:
        f = s.copy()
        f[:, [i, j]] *= -1
        flipped = {tuple(r) for r in ((f + shift) * 4).astype(np.int64).tolist()}
        assert flipped == keys


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.5])
def test_nearest_equals_brute_force(sigma):
    x = np.random.default_rng(int(sigma * 10)).standard_normal((1500, 8)) * sigma
    codes, vals = e8p.nearest(x)
    bf_codes, bf_dist = e8p.nearest_brute_force(x)
    dist = ((x - vals) ** 2).sum(axis=1)
    np.testing.assert_allclose(dist, bf_dist, rtol=0, atol=1e-9)
    assert np.mean(codes == bf_codes) > 0.999  # only exact ties may pick a different codeword
    np.testing.assert_array_equal(vals, e8p.codebook()[codes])


def test_numba_kernel_equals_numpy_reference():
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.standard_normal((3000, 8)) * 1.3, np.zeros((1, 8)), e8p.codebook()[::97] + 0.125])
    c1, v1 = e8p.nearest(x)
    c2, v2 = e8p.nearest_numpy(x, chunk=700)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(v1, v2)


def test_encode_decode_identity_on_codewords():
    codes, vals = e8p.nearest(e8p.codebook())
    np.testing.assert_array_equal(codes, np.arange(65536, dtype=np.uint16))
    np.testing.assert_array_equal(vals, e8p.codebook())


def test_gaussian_distortion_matches_published():
    x = np.random.default_rng(12).standard_normal((40000, 8))
    _, v = e8p.nearest(x * 1.03)
    mse = float(((x - v / 1.03) ** 2).mean())
    assert abs(mse - 0.0914) < 0.0914 * 0.02


# ---------------------------------------------------------------------------------------------
# Tensor quantizer
# ---------------------------------------------------------------------------------------------


def _uniform4_rowwise_mse(w: np.ndarray) -> float:
    """Best 4-level (2-bit) uniform mid-rise quantizer per row, step searched per row."""
    best = np.full(w.shape[0], np.inf)
    for c in np.linspace(0.3, 1.5, 61):
        step = c * w.std(axis=1, keepdims=True)
        q = np.clip(np.floor(w / step), -2, 1) + 0.5
        best = np.minimum(best, ((w - q * step) ** 2).sum(axis=1))
    return float(best.sum() / (w**2).sum())


def test_stream_layout_and_params():
    w = np.random.default_rng(13).standard_normal((24, 64)).astype(np.float32)
    qt = e8p.quantize_e8p("blocks.0.mlp.fc.weight", w, "float32", seed=5)
    codes = qt.streams["codes"]
    assert qt.scheme == "e8p" and qt.shape == (24, 64)
    assert codes.kind == "symbols" and (codes.lo, codes.hi) == (0, 65535)
    assert codes.data.dtype == np.dtype("<u2") and codes.data.shape == (24, 8)
    assert qt.streams["scale"].kind == "side" and qt.streams["scale"].data.dtype == np.float16
    assert qt.streams["scale"].data.shape == (24,)
    assert qt.params["rht"] is True and qt.params["seed"] == 5 and qt.params["pad_cols"] == 0
    assert qt.params["col_blocks"] == [[1, 64]] and qt.params["row_blocks"] == [[12, 2]]
    assert qt.raw_bytes("symbols") * 8 == 2 * w.size  # 2 bits per weight of codes


def test_beats_2bit_scalar_on_gaussian():
    w = np.random.default_rng(14).standard_normal((128, 256)).astype(np.float32)
    e = e8p.relative_error(w, dequantize_float32(e8p.quantize_e8p("w", w, "float32")))
    int2 = quantize_rtn("w", w, "float32", 2, clip="mse")
    assert e < e8p.relative_error(w, dequantize_float32(int2))
    assert e < _uniform4_rowwise_mse(w.astype(np.float64))
    assert e < 0.1


def test_rht_helps_heavy_tails():
    w = np.random.default_rng(15).standard_t(2.5, (64, 256))
    with_rht = e8p.relative_error(w, dequantize_float32(e8p.quantize_e8p("w", w, "float64", rht=True)))
    without = e8p.relative_error(w, dequantize_float32(e8p.quantize_e8p("w", w, "float64", rht=False)))
    assert with_rht < 0.8 * without


def _correlated_problem(rng, m=64, n=128):
    mix = rng.standard_normal((n, n)) * 0.3 + np.eye(n)
    x = rng.standard_normal((2048, n)) @ mix
    x[:, :3] *= 15  # outlier input channels
    return rng.standard_normal((m, n)), x.T @ x


def test_ldlq_reduces_hessian_error():
    w, h = _correlated_problem(np.random.default_rng(16))
    hr = e8p.regularize_hessian(h)
    plain = e8p.quantize_e8p("w", w, "float64", hessian=h, ldlq=False)
    ldlq = e8p.quantize_e8p("w", w, "float64", hessian=h, ldlq=True)
    assert ldlq.params["ldlq"] and not plain.params["ldlq"]
    e_plain = e8p.relative_error(w, dequantize_float32(plain), hr)
    e_ldlq = e8p.relative_error(w, dequantize_float32(ldlq), hr)
    assert e_ldlq < 0.6 * e_plain


def test_ldlq_with_identity_hessian_is_nearest_rounding():
    w = np.random.default_rng(17).standard_normal((16, 48))
    a = e8p.quantize_e8p("w", w, "float64", hessian=np.eye(48), ldlq=True)
    b = e8p.quantize_e8p("w", w, "float64", ldlq=False)
    np.testing.assert_array_equal(a.streams["codes"].data, b.streams["codes"].data)


def test_block_ldl_factorisation():
    _, h = _correlated_problem(np.random.default_rng(18), n=32)
    h = e8p.regularize_hessian(h)
    lt = e8p.block_ldl(h)
    inv = np.linalg.inv(lt)
    d = inv @ h @ inv.T
    blockdiag = np.kron(np.eye(4), np.ones((8, 8))).astype(bool)
    np.testing.assert_allclose(d[~blockdiag], 0, atol=1e-9)  # H = L~ D L~^T, D block-diagonal
    for s in range(0, 32, 8):
        np.testing.assert_allclose(lt[s : s + 8, s : s + 8], np.eye(8), atol=1e-12)
        np.testing.assert_array_equal(lt[:s, s : s + 8], 0)


def _reference_ldlq(x, h):
    """The unbuffered QuIP# loop: last block first, T = W0_k + (W0 - W^)_{>k} L~_{>k,k}."""
    lt = e8p.block_ldl(h)
    m, n = x.shape
    q = np.zeros_like(x)
    codes = np.zeros((m, n // 8), dtype=np.uint16)
    for k in range(n - 8, -1, -8):
        t = x[:, k : k + 8] + (x[:, k + 8 :] - q[:, k + 8 :]) @ lt[k + 8 :, k : k + 8]
        c, v = e8p.nearest(t)
        codes[:, k // 8], q[:, k : k + 8] = c, v
    return codes


@pytest.mark.parametrize("buffer", [8, 24, 128])
def test_buffered_ldlq_matches_reference_loop(buffer):
    rng = np.random.default_rng(23)
    w, h = _correlated_problem(rng, m=40, n=64)
    h = e8p.regularize_hessian(h)
    ref = _reference_ldlq(w, h)
    got = e8p.ldlq_round(w, h, buffer=buffer)
    assert np.mean(got == ref) > 0.999  # float association differs; only near-ties may flip
    # The proxy loss decomposes into the per-step rounding errors weighted by D_k.
    lt = e8p.block_ldl(h)
    err = w - e8p.codebook()[got.reshape(-1)].reshape(w.shape)
    inv = np.linalg.inv(lt)
    d = inv @ h @ inv.T
    steps = err @ lt
    per_step = sum(np.trace(steps[:, s : s + 8] @ d[s : s + 8, s : s + 8] @ steps[:, s : s + 8].T) for s in range(0, 64, 8))
    np.testing.assert_allclose(per_step, np.trace(err @ h @ err.T), rtol=1e-8)


def test_deterministic_and_dtype_restored():
    w = np.random.default_rng(19).standard_normal((32, 96)).astype(np.float32)
    a = e8p.quantize_e8p("w", w, "bfloat16")
    b = e8p.quantize_e8p("w", w, "bfloat16")
    np.testing.assert_array_equal(a.streams["codes"].data, b.streams["codes"].data)
    np.testing.assert_array_equal(a.streams["scale"].data, b.streams["scale"].data)
    d1, d2 = dequantize_float32(a), dequantize_float32(a)
    assert d1.tobytes() == d2.tobytes()
    assert str(dequantize_tensor(a).dtype) == "torch.bfloat16"


def test_tensor_scale_mode_and_padding():
    w = np.random.default_rng(20).standard_normal((10, 36))
    qt = e8p.quantize_e8p("w", w, "float64", scale_mode="tensor")
    assert qt.params["pad_cols"] == 4 and qt.streams["codes"].data.shape == (10, 5)
    assert qt.streams["scale"].data.shape == (1,)
    assert e8p.relative_error(w, dequantize_float32(qt)) < 0.15


def test_zero_rows_decode_to_zero():
    w = np.random.default_rng(21).standard_normal((8, 16))
    w[3] = 0
    out = dequantize_float32(e8p.quantize_e8p("w", w, "float64", rht=False))
    np.testing.assert_array_equal(out[3], 0)


def test_user_errors():
    with pytest.raises(PgolfError, match="2-D"):
        e8p.quantize_e8p("v", np.ones(8), "float32")
    with pytest.raises(PgolfError, match="NaN"):
        e8p.quantize_e8p("w", np.full((2, 8), np.nan), "float32")
    with pytest.raises(PgolfError, match="Hessian"):
        e8p.quantize_e8p("w", np.ones((2, 8)), "float32", hessian=np.eye(4))
    with pytest.raises(PgolfError, match="scale mode"):
        e8p.quantize_e8p("w", np.ones((2, 8)), "float32", scale_mode="group")
    qt = e8p.quantize_e8p("w", np.ones((2, 8)), "float32")
    qt.streams["codes"].data = qt.streams["codes"].data[:, :0]
    with pytest.raises(ArtifactError):
        dequantize_float32(qt)


def test_rank_fallbacks():
    rng = np.random.default_rng(22)
    tensors = {
        "gauss": rng.standard_normal((32, 64)),
        "spiky": rng.standard_normal((32, 64)) * (rng.random((32, 64)) < 0.02) * 30,
        "t3": rng.standard_t(3, (32, 64)),
        "const": np.full((32, 64), 0.02),
    }
    w, h = _correlated_problem(rng, m=32, n=64)
    tensors["hess"] = w
    reports = e8p.rank_e8p_fallbacks(tensors, budget=2, hessians={"hess": h}, ldlq=False)
    assert [r.name for r in reports if r.fallback] == [r.name for r in reports[:2]]
    errs = [r.rel_err for r in reports]
    assert errs == sorted(errs, reverse=True)
    for r in reports:
        hr = e8p.regularize_hessian(h) if r.name == "hess" else None
        assert r.rel_err == pytest.approx(e8p.relative_error(tensors[r.name], dequantize_float32(r.qt), hr))
    # Random signs turn a constant matrix into a rank-1 product of two Gaussian vectors, whose
    # entries are far more peaked than a Gaussian: the worst case for a rotated lattice.
    assert reports[0].name == "const"
    assert not any(r.fallback for r in e8p.rank_e8p_fallbacks(list(tensors.items())[:1], budget=0))
    with pytest.raises(PgolfError):
        e8p.rank_e8p_fallbacks(tensors, budget=-1)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 40),
    seed=st.integers(0, 1000),
    rht=st.booleans(),
    mode=st.sampled_from(e8p.SCALE_MODES),
)
def test_roundtrip_property(m, n, seed, rht, mode):
    w = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
    qt = e8p.quantize_e8p("w", w, "float32", rht=rht, seed=seed, scale_mode=mode)
    out = dequantize_float32(qt)
    assert out.shape == (m, n) and np.all(np.isfinite(out))
    assert qt.streams["codes"].data.shape == (m, (n + 7) // 8)
    assert e8p.relative_error(w, out) < 0.5


def test_pipeline_fallback_sends_worst_to_intk():
    from pgolf_pack.pack.packer import pack_model, unpack_model
    from pgolf_pack.pipeline import quantize_tensors
    from pgolf_pack.recipe import recipe_from_dict

    rng = np.random.default_rng(5)
    tensors = {
        "a.weight": torch.from_numpy(rng.standard_normal((64, 64)).astype(np.float32)),
        "const.weight": torch.full((64, 64), 0.02),
        "b.weight": torch.from_numpy(rng.standard_normal((64, 128)).astype(np.float32)),
    }
    base = {"method": "e8p", "ldlq": False, "fallback_bits": 5}
    rec = recipe_from_dict({"default": {**base, "fallback": 1}, "min_numel": 16})
    qm = quantize_tensors(tensors, rec)
    schemes = {t.name: t.scheme for t in qm.tensors}
    assert schemes == {"a.weight": "e8p", "const.weight": "intk", "b.weight": "e8p"}
    fb = next(t for t in qm.tensors if t.name == "const.weight")
    assert fb.params["bits"] == 5 and fb.params["fallback_from"]["method"] == "e8p"
    assert qm.meta["e8p_fallback"] == ["const.weight"]
    # The int-k fallback is far closer than the rotated VQ was on this matrix.
    assert e8p.relative_error(tensors["const.weight"].numpy(), dequantize_float32(fb)) < fb.params["fallback_from"]["rel_error"]
    back, _ = unpack_model(pack_model(qm, codec="zstd").blob)
    for t, u in zip(qm.tensors, back.tensors):
        np.testing.assert_array_equal(dequantize_float32(t), dequantize_float32(u))
    plain = quantize_tensors(tensors, recipe_from_dict({"default": base, "min_numel": 16}))
    assert all(t.scheme == "e8p" for t in plain.tensors) and "e8p_fallback" not in plain.meta


@pytest.mark.parametrize("bad", [{"fallback": -1}, {"fallback": 1.5}, {"fallback_bits": 9}])
def test_fallback_settings_are_checked(bad):
    from pgolf_pack.recipe import recipe_from_dict

    with pytest.raises(PgolfError, match="fallback"):
        recipe_from_dict({"default": {"method": "e8p", **bad}})
