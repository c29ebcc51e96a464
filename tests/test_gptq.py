import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pgolf_pack.errors import PgolfError
from pgolf_pack.quant.base import dequantize_float32
from pgolf_pack.quant.gptq import (
    gptq_quantize,
    gptq_sweep,
    hessian_error,
    prepare_hessian,
    round_nearest,
)
from pgolf_pack.quant.rtn import choose_scales, dequantize_rows, qmax, quantize_rtn, quantize_with_scales


def correlated_inputs(rng, n, cols, mix=0.9):
    """Rows of X whose features share strong common factors (as real activations do)."""
    base = rng.standard_normal((n, cols))
    factors = rng.standard_normal((n, 4)) @ rng.standard_normal((4, cols))
    scale = np.exp(rng.normal(0, 0.7, cols))  # uneven feature energies, so act-order matters
    return ((1 - mix) * base + mix * factors) * scale


def heavy_weight(rng, rows, cols):
    w = rng.standard_normal((rows, cols)) * 0.05
    w[rng.random((rows, cols)) < 0.01] *= 6
    return w.astype(np.float32)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.integers(2, 8),
    rows=st.integers(1, 40),
    cols=st.integers(2, 70),
    act_order=st.booleans(),
    block=st.sampled_from([1, 7, 128]),
)
def test_identity_hessian_reproduces_rtn(seed, bits, rows, cols, act_order, block):
    rng = np.random.default_rng(seed)
    w = heavy_weight(rng, rows, cols)
    qt = gptq_quantize("w", w, "float32", np.eye(cols), bits, sigmas=3.0, block_size=block, act_order=act_order)
    ref = quantize_rtn("w", w, "float32", bits, sigmas=3.0)
    np.testing.assert_array_equal(qt.streams["scale"].data, ref.streams["scale"].data)
    np.testing.assert_array_equal(qt.streams["q"].data, ref.streams["q"].data)


@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_with_clip_search_matches_rtn(act_order, rng):
    w = heavy_weight(rng, 24, 48)
    h = np.eye(48) * 5.0  # a scaled identity: same column weights, same damping ratio
    qt = gptq_quantize("w", w, "float32", h, 6, clip="sdclip", act_order=act_order)
    ref = quantize_rtn("w", w, "float32", 6, clip="sdclip", col_weight=np.diagonal(h))
    assert qt.params["searched"] and qt.params["sigmas"] == ref.params["sigmas"]
    np.testing.assert_array_equal(qt.streams["q"].data, ref.streams["q"].data)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_gptq_beats_rtn_on_correlated_inputs(bits, rng):
    rows, cols = 48, 96
    w = heavy_weight(rng, rows, cols)
    x = correlated_inputs(rng, 2000, cols)
    h = x.T @ x
    scale, _ = choose_scales(w, bits, "sdclip", sigmas=4.0)
    w_rtn = dequantize_rows(quantize_with_scales(w, scale, bits), scale)
    w_gptq = dequantize_rows(gptq_sweep(w, h, scale, bits), scale)
    e_rtn = hessian_error(w, w_rtn, h)
    e_gptq = hessian_error(w, w_gptq, h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_gptq_quantize_layout_and_params(rng):
    w = heavy_weight(rng, 40, 64)
    x = correlated_inputs(rng, 500, 64)
    qt = gptq_quantize("blocks.0.mlp.fc.weight", w, "bfloat16", x.T @ x, 6, sigmas=12.85, block_size=16)
    assert qt.scheme == "intk" and qt.shape == (40, 64) and qt.dtype == "bfloat16"
    assert qt.params == {
        "bits": 6, "method": "gptq", "clip": "sdclip", "sigmas": 12.85,
        "block_size": 16, "damp": 0.01, "act_order": True,
    }
    q = qt.streams["q"]
    assert q.kind == "symbols" and q.data.dtype == np.int8 and (q.lo, q.hi) == (-31, 31)
    assert np.abs(q.data).max() <= 31
    assert qt.streams["scale"].data.dtype == np.float16
    np.testing.assert_array_equal(dequantize_float32(qt), dequantize_rows(q.data, qt.streams["scale"].data))


def test_hessian_error_is_output_error(rng):
    w = rng.standard_normal((6, 10))
    w_hat = w + rng.standard_normal((6, 10)) * 0.1
    x = rng.standard_normal((50, 10))
    direct = float(((x @ w.T - x @ w_hat.T) ** 2).sum())
    assert hessian_error(w, w_hat, x.T @ x) == pytest.approx(direct, rel=1e-10)


def test_act_order_permutation_roundtrip(rng):
    rows, cols = 20, 50
    w = heavy_weight(rng, rows, cols)
    x = correlated_inputs(rng, 400, cols)
    h = x.T @ x
    scale, _ = choose_scales(w, 5, "sdclip", sigmas=4.0)
    prep = prepare_hessian(h, act_order=True)
    perm = prep.perm.numpy()
    assert np.all(np.diff(np.diagonal(h)[perm]) <= 0)  # descending diagonal
    assert not np.array_equal(perm, np.arange(cols))

    q = gptq_sweep(w, prep, scale, 5, block_size=8)
    # The same problem with columns permuted by hand and no act-order must give the same codes.
    q_ref = gptq_sweep(w[:, perm], h[np.ix_(perm, perm)], scale, 5, block_size=8, act_order=False)
    np.testing.assert_array_equal(q[:, perm], q_ref)
    # And the stored (original-order) symbols dequantize to that reference's weight, unpermuted.
    np.testing.assert_array_equal(dequantize_rows(q, scale)[:, perm], dequantize_rows(q_ref, scale))
    # Without act-order the sweep order differs, so the codes do too.
    assert not np.array_equal(q, gptq_sweep(w, h, scale, 5, block_size=8, act_order=False))


def test_block_size_does_not_change_the_result(rng):
    w = heavy_weight(rng, 16, 40)
    x = correlated_inputs(rng, 300, 40)
    h = x.T @ x
    scale, _ = choose_scales(w, 4, "sdclip", sigmas=4.0)
    qs = [gptq_sweep(w, h, scale, 4, block_size=b, sweep_dtype=torch.float64) for b in (1, 6, 40, 128)]
    for q in qs[1:]:
        np.testing.assert_array_equal(q, qs[0])


def test_dead_columns(rng):
    rows, cols = 12, 30
    dead = [0, 7, 29]
    w = heavy_weight(rng, rows, cols)
    x = correlated_inputs(rng, 300, cols)
    x[:, dead] = 0
    h = x.T @ x
    qt = gptq_quantize("w", w, "float32", h, 4, sigmas=4.0, block_size=8)
    q = qt.streams["q"].data
    assert np.all(q[:, dead] == 0)
    assert np.any(q[:, [c for c in range(cols) if c not in dead]] != 0)
    scale = qt.streams["scale"].data
    rtn = dequantize_rows(quantize_with_scales(w, scale, 4), scale)
    assert hessian_error(w, dequantize_float32(qt), h) < hessian_error(w, rtn, h)


def test_all_columns_dead(rng):
    w = heavy_weight(rng, 5, 8)
    qt = gptq_quantize("w", w, "float32", np.zeros((8, 8)), 6, sigmas=3.0)
    assert np.all(qt.streams["q"].data == 0)


def test_rank_deficient_hessian_is_handled_by_damping(rng):
    x = rng.standard_normal((5, 40))  # rank 5 of 40: singular without damping
    w = heavy_weight(rng, 10, 40)
    qt = gptq_quantize("w", w, "float32", x.T @ x, 6, sigmas=4.0)
    assert qt.params["damp"] == 0.01
    assert np.all(np.isfinite(dequantize_float32(qt)))


def test_non_positive_definite_hessian_is_refused(rng):
    w = heavy_weight(rng, 4, 6)
    h = np.eye(6)
    h[0, 0] = -50.0
    with pytest.raises(PgolfError, match=r"Hessian for blk.w is not positive definite even with damp=1"):
        gptq_quantize("blk.w", w, "float32", h, 6, sigmas=3.0)


def test_damping_retries_until_factorization_succeeds(rng):
    # Eigenvalue -0.5 vs mean diagonal ~1: fails at 1% and 10%, succeeds at 100% damping.
    h = np.eye(6)
    h[0, 0] = -0.5
    assert prepare_hessian(h, damp=0.01).damp == pytest.approx(1.0)


@pytest.mark.parametrize(
    "h, msg",
    [
        (np.eye(5), r"Hessian for w has shape \(5, 5\), expected \(6, 6\)"),
        (np.ones((6, 5)), r"Hessian for w has shape \(6, 5\), expected \(6, 6\)"),
        (np.where(np.eye(6) > 0, np.nan, 0.0), r"Hessian for w contains NaN or Inf"),
    ],
)
def test_bad_hessians_are_refused(h, msg, rng):
    with pytest.raises(PgolfError, match=msg):
        gptq_quantize("w", heavy_weight(rng, 3, 6), "float32", h, 6)


def test_non_finite_weight_is_refused():
    w = np.zeros((3, 4), np.float32)
    w[1, 2] = np.inf
    with pytest.raises(PgolfError, match="w contains NaN or Inf"):
        gptq_quantize("w", w, "float32", np.eye(4), 6)


def test_round_fn_is_swappable(rng):
    w = heavy_weight(rng, 10, 20)
    scale, _ = choose_scales(w, 4, "sdclip", sigmas=3.0)
    seen = []

    def toward_zero(x, s, *, qmax, col, err_weight):
        seen.append((col, err_weight))
        return torch.clamp(torch.trunc(x / s), -qmax, qmax)

    q = gptq_sweep(w, np.eye(20), scale, 4, round_fn=toward_zero, act_order=False)
    expected = np.clip(np.trunc(w / scale.astype(np.float32)[:, None]), -qmax(4), qmax(4))
    np.testing.assert_array_equal(q, expected)
    assert [c for c, _ in seen] == list(range(20))
    assert all(e == pytest.approx(1.01) for _, e in seen)  # 1/[H⁻¹]_jj with 1% damping of I
    # The default rule is the plain nearest rounding RTN uses.
    np.testing.assert_array_equal(gptq_sweep(w, np.eye(20), scale, 4, round_fn=round_nearest), quantize_with_scales(w, scale, 4))


@pytest.mark.parametrize("act_order", [False, True])
def test_inputs_are_not_modified(act_order, rng):
    w = np.asfortranarray(heavy_weight(rng, 8, 16))
    x = correlated_inputs(rng, 100, 16)
    x[:, 3] = 0
    h = x.T @ x
    w0, h0 = w.copy(), h.copy()
    gptq_quantize("w", w, "float32", h, 3, sigmas=3.0, act_order=act_order)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(h, h0)


def test_prepared_hessian_is_shared_between_layers(rng):
    x = correlated_inputs(rng, 300, 32)
    h = x.T @ x
    prep = prepare_hessian(h, damp=0.01, act_order=False)
    for rows in (16, 8):
        w = heavy_weight(rng, rows, 32)
        shared = gptq_quantize("w", w, "float32", prep, 5)
        fresh = gptq_quantize("w", w, "float32", h, 5, act_order=False)
        assert shared.params == fresh.params and shared.params["act_order"] is False
        np.testing.assert_array_equal(shared.streams["q"].data, fresh.streams["q"].data)
        np.testing.assert_array_equal(shared.streams["scale"].data, fresh.streams["scale"].data)
    with pytest.raises(PgolfError, match=r"Hessian for w is 32×32, expected 10×10"):
        gptq_quantize("w", heavy_weight(rng, 4, 10), "float32", prep, 5)


def test_round_fn_out_of_range_is_caught(rng):
    w = heavy_weight(rng, 4, 6)
    scale, _ = choose_scales(w, 4, "sdclip", sigmas=3.0)

    def unclamped(x, s, *, qmax, col, err_weight):
        return torch.round(x / s) * 100

    with pytest.raises(ValueError, match=r"outside \[-7, 7\]"):
        gptq_sweep(w, np.eye(6), scale, 4, round_fn=unclamped)
