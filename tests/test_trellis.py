"""Trellis-coded (dependent) quantization: the Viterbi kernel, the state machine, exact decoding.

Run: python -m pytest -q tests/test_trellis.py
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import group_choices, pack_model, unpack_model
from pgolf_pack.quant.base import QuantizedModel, dequantize_float32
from pgolf_pack.quant.ecsq import make_grid
from pgolf_pack.quant.gptq import hessian_error, prepare_hessian
from pgolf_pack.quant.rdoq import natural_lambda
from pgolf_pack.quant.trellis import (
    DQ_STEP_RATIO,
    QSEL,
    TRANS,
    dq_levels,
    levels_from_recon,
    merge_classes,
    quantize_trellis,
    recon_of,
    split_by_class,
    trellis_levels,
    viterbi_column,
    viterbi_column_ref,
    walk_levels,
)


def correlated_h(rng, cols):
    x = rng.standard_normal((4 * cols, cols)) * np.exp(rng.normal(0, 1.0, cols))
    x += rng.standard_normal((4 * cols, 3)) @ rng.standard_normal((3, cols))
    return x.T @ x


def path_cost(u, wd, lam, cost, ctx, vmin, k):
    """D + λR of a level sequence walked through the state machine (the Viterbi objective)."""
    state, tot = 0, 0.0
    for r, kr in enumerate(k):
        q = QSEL[state]
        d = u[r] - recon_of(kr, q)
        tot += wd[r] * d * d + lam * cost[q, ctx[r], min(max(kr - vmin, 0), cost.shape[2] - 1)]
        state = TRANS[state, kr & 1]
    return tot


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), lam=st.sampled_from([0.0, 0.1, 1.0, 5.0]),
       nctx=st.integers(1, 3), spread=st.sampled_from([0.5, 3.0, 20.0]))
def test_viterbi_kernel_matches_numpy_reference(seed, rows, lam, nctx, spread):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(rows) * spread
    ties = rng.random(rows) < 0.3
    u[ties] = np.round(u[ties] * 2) / 2  # exact half-integers: equal-cost candidates
    wd = rng.uniform(0.1, 3.0, rows)
    cost = rng.uniform(0.5, 8.0, (2, nctx, 31))
    ctx = rng.integers(0, nctx, rows)
    m1, k1 = viterbi_column(u, wd, lam, cost, ctx, -15)
    m2, k2 = viterbi_column_ref(u, wd, lam, cost, ctx, -15)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(k1, k2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 4), lam=st.sampled_from([0.0, 0.3]))
def test_viterbi_finds_the_best_path(seed, rows, lam):
    rng = np.random.default_rng(seed)
    u = rng.uniform(-3, 3, rows)
    wd = rng.uniform(0.2, 2.0, rows)
    cost = rng.uniform(1.0, 4.0, (2, 1, 9))
    ctx = np.zeros(rows, np.int64)
    m, k = viterbi_column(u, wd, lam, cost, ctx, -4)
    # Exhaustive over every level sequence in [-4, 4] (the best levels for |u| <= 3 lie inside).
    best = min(path_cost(u, wd, lam, cost, ctx, -4, seq) for seq in itertools.product(range(-4, 5), repeat=rows))
    assert path_cost(u, wd, lam, cost, ctx, -4, k) <= best + 1e-9
    # the reconstruction it reports is the one its levels walk to
    np.testing.assert_array_equal(walk_levels(k[:, None])[0][:, 0], m)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 30), cols=st.integers(1, 12))
def test_state_machine_roundtrips(seed, rows, cols):
    rng = np.random.default_rng(seed)
    k = rng.integers(-9, 10, (rows, cols))
    m, cls = walk_levels(k)
    k2, cls2 = levels_from_recon(m)
    np.testing.assert_array_equal(k, k2)
    np.testing.assert_array_equal(cls, cls2)
    q0, q1 = split_by_class(k, cls)
    assert q0.size + q1.size == k.size
    np.testing.assert_array_equal(merge_classes(q0, q1, k.shape), k)


def test_off_trellis_reconstruction_is_rejected():
    with pytest.raises(ValueError):
        levels_from_recon(np.array([[1]]))  # state 0 is Q0: only even multiples


@pytest.mark.parametrize("coding", ["plain", "split"])
@pytest.mark.parametrize("with_h", [False, True])
def test_decoder_reproduces_encoder_reconstruction(rng, coding, with_h):
    w = (rng.standard_normal((24, 40)) * 0.05).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 10
    h = correlated_h(rng, 40)
    prep = prepare_hessian(h) if with_h else None
    beta = 1.0 if with_h else 0.0
    grid = make_grid(w, DQ_STEP_RATIO * 0.3, prep, "std", beta)
    k, m = trellis_levels(w, grid, prep, lam=1e-4, coding=coding)
    qt = quantize_trellis("w", w, "float32", 0.3, 1e-4, prep, "std", beta, coding=coding)
    np.testing.assert_array_equal(dq_levels(qt), k)
    np.testing.assert_array_equal(walk_levels(dq_levels(qt))[0], m)  # decoder: levels + state machine -> m
    np.testing.assert_array_equal(dequantize_float32(qt), m.astype(np.float32) * grid.steps())
    qm = QuantizedModel([qt])
    res = pack_model(qm, codec="entropy")
    back, manifest = unpack_model(res.blob)
    np.testing.assert_array_equal(dequantize_float32(back.tensors[0]), m.astype(np.float32) * grid.steps())
    assert pack_model(back, codec="entropy", choices=group_choices(manifest)).blob == res.blob


def test_trellis_beats_its_single_quantizer(rng):
    """The trellis searches a union of two step-2s grids, so at λ = 0 it must do better than the
    path that never leaves Q0 (every level even), which is one of its paths."""
    w = (rng.standard_normal((64, 32)) * 0.05).astype(np.float32)
    h = correlated_h(rng, 32)
    prep = prepare_hessian(h)
    grid = make_grid(w, 0.2, prep, "flat", 0.0)
    _, m = trellis_levels(w, grid, None, lam=0.0)
    steps = grid.steps()
    q0_only = 2 * np.rint(w / (2 * steps))
    assert np.sum((w - m * steps) ** 2) < np.sum((w - q0_only * steps) ** 2)
    _, mh = trellis_levels(w, grid, prep, lam=0.0)
    assert hessian_error(w, mh * steps, h) < hessian_error(w, q0_only * steps, h)


def test_rate_term_lowers_the_rate(rng):
    from pgolf_pack.coding.entropy import estimate_bits

    w = (rng.standard_normal((64, 48)) * 0.05).astype(np.float32)
    prep = prepare_hessian(correlated_h(rng, 48))
    grid = make_grid(w, 0.25, prep, "flat", 1.0)
    k0, _ = trellis_levels(w, grid, prep, lam=0.0)
    k1, _ = trellis_levels(w, grid, prep, lam=3 * natural_lambda(grid, prep))
    bits = [estimate_bits([k], int(k.min()), int(k.max()), "col") for k in (k0, k1)]
    assert bits[1] < bits[0]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 12), cols=st.integers(2, 20),
       coding=st.sampled_from(["plain", "split"]), codec=st.sampled_from(["entropy", "auto-fast"]))
def test_packer_roundtrip_is_byte_exact(seed, rows, cols, coding, codec):
    rng = np.random.default_rng(seed)
    ts = []
    for i in range(2):
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        ts.append(quantize_trellis(f"blocks.{i}.attn.c_q.weight", w, "float32", 0.3, 1e-3, correlated_h(rng, cols),
                                   "flat", 1.0, coding=coding))
    qm = QuantizedModel(ts)
    res = pack_model(qm, codec=codec)
    back, manifest = unpack_model(res.blob)
    for a, b in zip(qm.tensors, back.tensors):
        np.testing.assert_array_equal(dq_levels(a), dq_levels(b))
        np.testing.assert_array_equal(dequantize_float32(a), dequantize_float32(b))
    assert pack_model(back, codec=codec, choices=group_choices(manifest)).blob == res.blob


def test_bad_arguments(rng):
    w = (rng.standard_normal((4, 8)) * 0.05).astype(np.float32)
    with pytest.raises(PgolfError):
        quantize_trellis("w", w, "float32", 0.3, 0.0, states=8)
    with pytest.raises(PgolfError):
        quantize_trellis("w", w, "float32", 0.3, -1.0)
    with pytest.raises(PgolfError):
        quantize_trellis("w", w, "float32", 0.3, 0.0, coding="zigzag")
    with pytest.raises(ValueError):
        viterbi_column(np.zeros(3), np.ones(3), 0.0, np.zeros((2, 1, 1)), np.array([0, 1, 0]), 0)
