"""ECSQ (free step, unbounded codes) and rate-aware rounding inside GPTQ.

Run: python -m pytest -q tests/test_ecsq.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import group_choices, pack_model, unpack_model
from pgolf_pack.quant.base import QuantizedModel, dequantize_float32
from pgolf_pack.quant.ecsq import (
    COL_EXP_MAX,
    COL_EXP_MIN,
    column_weights,
    col_exponents,
    ecsq_codes,
    make_grid,
    quantize_ecsq,
)
from pgolf_pack.quant.gptq import gptq_sweep, gptq_sweep_range, hessian_error, prepare_hessian
from pgolf_pack.quant.rdoq import RdoqRound, fit_rate_table, natural_lambda, quantize_ecsq_rdoq, rdoq_codes


def correlated_h(rng, cols, n=None, spread=1.0):
    n = n or 4 * cols
    x = rng.standard_normal((n, cols)) * np.exp(rng.normal(0, spread, cols))
    x += rng.standard_normal((n, 3)) @ rng.standard_normal((3, cols))
    return x.T @ x


def heavy(rng, rows, cols, scale=0.05):
    w = rng.standard_normal((rows, cols)) * scale
    w[rng.random((rows, cols)) < 0.02] *= 12  # far outliers: ECSQ must keep them
    return w.astype(np.float32)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 24), cols=st.integers(2, 40),
       delta=st.floats(0.05, 3.0), row_mode=st.sampled_from(["std", "flat"]))
def test_rtn_ecsq_never_clips(seed, rows, cols, delta, row_mode):
    rng = np.random.default_rng(seed)
    w = heavy(rng, rows, cols)
    qt = quantize_ecsq("w", w, "float32", delta, None, row_mode=row_mode)
    step = qt.streams["scale"].data.astype(np.float32)[:, None]
    err = np.abs(dequantize_float32(qt) - w)
    assert np.all(err <= 0.5 * step * (1 + 1e-5) + 1e-7)
    q = qt.streams["q"]
    assert q.kind == "symbols" and q.lo == q.data.min() and q.hi == q.data.max()


def test_wide_codes_use_int32(rng):
    w = rng.standard_normal((2, 64)).astype(np.float32)
    w[0, 0] = 1e4  # at this step its code is ~1e5, beyond int16
    qt = quantize_ecsq("w", w, "float32", 1e-4, None, row_mode="flat")
    assert qt.streams["q"].data.dtype == np.int32
    np.testing.assert_allclose(dequantize_float32(qt)[0, 0], 1e4, rtol=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_sweep_range_matches_int_k_sweep(rng, act_order):
    w = heavy(rng, 20, 48)
    h = correlated_h(rng, 48)
    scales = (np.abs(w).max(axis=1) / 127).astype(np.float16)
    a = gptq_sweep(w, h, scales, 8, block_size=16, act_order=act_order)
    b = gptq_sweep_range(w, h, scales, 127, block_size=16, act_order=act_order)
    assert b.dtype == np.int32
    np.testing.assert_array_equal(a.astype(np.int32), b)


def test_column_steps_follow_the_equal_slope_rule(rng):
    h = correlated_h(rng, 32, spread=1.5)
    prep = prepare_hessian(h)
    ew = column_weights(prep)
    e = col_exponents(ew, 1.0).astype(np.float64)
    live = (e < COL_EXP_MAX) & (e > COL_EXP_MIN)
    # step_j² · ω_j is equal across columns up to the quarter-octave rounding of the exponents.
    slope = np.log2(ew[live]) + 2 * e[live] / 4
    assert slope.max() - slope.min() <= 2 * 0.5 / 4 * 2 + 1e-9


def test_column_steps_lower_the_hessian_error_at_equal_rate(rng):
    w = heavy(rng, 64, 48)
    h = correlated_h(rng, 48, spread=1.5)
    prep = prepare_hessian(h)
    flat = quantize_ecsq("w", w, "float32", 0.4, prep, row_mode="flat")
    col = quantize_ecsq("w", w, "float32", 0.4, prep, row_mode="flat", col_beta=1.0)
    e_flat = hessian_error(w, dequantize_float32(flat), h)
    e_col = hessian_error(w, dequantize_float32(col), h)
    assert e_col < e_flat


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 20), cols=st.integers(2, 36),
       act_order=st.booleans(), block=st.sampled_from([1, 5, 128]), beta=st.sampled_from([0.0, 1.0]))
def test_rdoq_at_lambda_zero_is_plain_gptq(seed, rows, cols, act_order, block, beta):
    rng = np.random.default_rng(seed)
    w = heavy(rng, rows, cols)
    prep = prepare_hessian(correlated_h(rng, cols), act_order=act_order)
    grid = make_grid(w, 0.3, prep, "std", beta)
    plain = ecsq_codes(w, grid, prep, block_size=block)
    rd, _ = rdoq_codes(w, grid, prep, 0.0, iters=2, block_size=block)
    np.testing.assert_array_equal(plain, rd)


def test_rdoq_trades_error_for_bits(rng):
    w = heavy(rng, 48, 64)
    h = correlated_h(rng, 64)
    prep = prepare_hessian(h)
    grid = make_grid(w, 0.3, prep, "flat", 1.0)
    lam0 = natural_lambda(grid, prep)
    steps = grid.steps()
    plain = ecsq_codes(w, grid, prep)
    table = fit_rate_table(plain)
    errs, bits, zeros = [], [], []
    for g in (0.0, 1.0, 4.0):
        q, _ = rdoq_codes(w, grid, prep, g * lam0, init=plain)
        errs.append(hessian_error(w, q * steps, h))
        bits.append(table.bits(q))
        zeros.append(int((q == 0).sum()))
    assert errs[0] < errs[1] < errs[2]
    assert bits[0] > bits[1] > bits[2]
    assert zeros[0] < zeros[2]


def test_rdoq_round_rejects_bad_lambda(rng):
    table = fit_rate_table(rng.integers(-3, 4, (4, 5)))
    with pytest.raises(PgolfError):
        RdoqRound(table, -1.0)
    with pytest.raises(PgolfError):
        RdoqRound(table, float("nan"))


def test_rate_table_prices_out_of_range_codes_finitely(rng):
    q = rng.integers(-3, 4, (30, 8))
    t = fit_rate_table(q)
    assert torch.isfinite(t.costs).all()
    x = torch.tensor([0.0, 500.0, -800.0] * 10)
    out = RdoqRound(t, 1e-3)(x, torch.ones(30), qmax=2**30, col=0, err_weight=1.0)
    assert out[1] > 400 and out[2] < -700  # large inputs still get large codes


def test_bad_arguments(rng):
    w = heavy(rng, 4, 8)
    with pytest.raises(PgolfError):
        quantize_ecsq("w", w, "float32", 0.0)
    with pytest.raises(PgolfError):
        quantize_ecsq("w", w, "float32", 0.3, None, col_beta=1.0)  # column steps need a Hessian
    with pytest.raises(PgolfError):
        quantize_ecsq("w", w, "float32", 0.3, np.eye(5))  # wrong Hessian shape
    with pytest.raises(PgolfError):
        quantize_ecsq("w", w, "float32", 0.3, None, row_mode="rows")


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 16), cols=st.integers(2, 24),
       codec=st.sampled_from(["entropy", "auto-fast"]), rdoq=st.booleans())
def test_packer_roundtrip_is_byte_exact(seed, rows, cols, codec, rdoq):
    rng = np.random.default_rng(seed)
    tensors = []
    for i in range(2):
        w = heavy(rng, rows, cols)
        h = correlated_h(rng, cols)
        if rdoq:
            tensors.append(quantize_ecsq_rdoq(f"blocks.{i}.mlp.fc.weight", w, "float32", 0.25, 1e-3, h, col_beta=1.0))
        else:
            tensors.append(quantize_ecsq(f"blocks.{i}.mlp.fc.weight", w, "float32", 0.25, h, col_beta=1.0))
    qm = QuantizedModel(tensors)
    res = pack_model(qm, codec=codec)
    back, manifest = unpack_model(res.blob)
    for a, b in zip(qm.tensors, back.tensors):
        assert a.scheme == b.scheme == "ecsq"
        for k in a.streams:
            assert a.streams[k].data.dtype == b.streams[k].data.dtype
            np.testing.assert_array_equal(a.streams[k].data, b.streams[k].data)
        np.testing.assert_array_equal(dequantize_float32(a), dequantize_float32(b))
    assert pack_model(back, codec=codec, choices=group_choices(manifest)).blob == res.blob
