"""Numba kernels against their numpy references: bit packing, byte shuffle, L1 row chain, counts.

Run: python -m pytest -q tests/test_kernels.py
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_pack.kernels.bitpack import (
    pack_bits,
    pack_bits_ref,
    packed_size,
    unpack_bits,
    unpack_bits_ref,
)
from pgolf_pack.kernels.rowsort import l1_chain_order, l1_chain_order_ref
from pgolf_pack.kernels.shuffle import byte_shuffle, byte_shuffle_ref, byte_unshuffle, byte_unshuffle_ref

SETTINGS = settings(max_examples=40, deadline=None)
INT_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "int64"]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- bit packing -----------------------------------------------------------------------------------


@SETTINGS
@given(bits=st.integers(1, 32), n=st.integers(0, 300), dtype=st.sampled_from(["uint8", "uint16", "uint32", "int32", "int64"]), seed=st.integers(0, 2**32 - 1))
def test_pack_bits_matches_reference_and_roundtrips(bits, n, dtype, seed):
    if dtype == "uint8" and bits > 8:
        dtype = "uint16"
    if dtype in ("uint16", "int32") and bits > 16:
        dtype = "uint32" if dtype == "uint16" else "int64"
    v = _rng(seed).integers(0, 1 << bits, n).astype(dtype)
    packed = pack_bits(v, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(n, bits)
    np.testing.assert_array_equal(packed, pack_bits_ref(v, bits))
    back = unpack_bits(packed, bits, n)
    np.testing.assert_array_equal(back, unpack_bits_ref(packed, bits, n))
    np.testing.assert_array_equal(back.astype(np.int64), v.astype(np.int64))
    assert back.dtype == (np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)


def test_pack_bits_known_stream():
    # Symbols 0..3 at 2 bits, LSB first: 00 01 10 11 -> 0b11100100.
    assert pack_bits(np.array([0, 1, 2, 3], np.uint8), 2).tolist() == [0xE4]
    # 3 symbols of 5 bits: 15 bits, one zero pad bit; 31 | 0 << 5 | 31 << 10.
    assert pack_bits(np.array([31, 0, 31], np.uint8), 5).tolist() == [0x1F, 0x7C]


def test_unpack_accepts_bytes_and_ignores_padding():
    packed = pack_bits(np.array([5, 6, 7], np.uint8), 3).tobytes()
    assert unpack_bits(packed, 3, 3).tolist() == [5, 6, 7]
    assert unpack_bits(packed, 3, 2).tolist() == [5, 6]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_pack_bits_rejects_out_of_range(dtype):
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(np.array([0, 8], dtype=dtype), 3)
    with pytest.raises(ValueError):
        pack_bits_ref(np.array([0, 8], dtype=dtype), 3)


def test_pack_bits_rejects_negative_and_bad_widths():
    with pytest.raises(ValueError):
        pack_bits(np.array([-1], np.int8), 7)
    for bits in (0, 33):
        with pytest.raises(ValueError):
            pack_bits(np.zeros(3, np.uint8), bits)
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(np.zeros(2, np.uint8), 6, 3)


# --- byte shuffle ----------------------------------------------------------------------------------


@SETTINGS
@given(itemsize=st.integers(1, 8), n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_byte_shuffle_matches_reference_and_inverts(itemsize, n, seed):
    buf = _rng(seed).integers(0, 256, n * itemsize).astype(np.uint8)
    sh = byte_shuffle(buf, itemsize)
    np.testing.assert_array_equal(sh, byte_shuffle_ref(buf, itemsize))
    np.testing.assert_array_equal(byte_unshuffle(sh, itemsize), buf)
    np.testing.assert_array_equal(byte_unshuffle_ref(sh, itemsize), buf)


def test_byte_shuffle_planes_of_int16():
    v = np.array([1, 258, -1], dtype="<i2")  # bytes 01 00 | 02 01 | ff ff
    assert byte_shuffle(v.tobytes(), 2).tolist() == [0x01, 0x02, 0xFF, 0x00, 0x01, 0xFF]


def test_byte_shuffle_rejects_partial_items():
    with pytest.raises(ValueError, match="whole number"):
        byte_shuffle(np.zeros(5, np.uint8), 2)


# --- L1 row chain ----------------------------------------------------------------------------------


@SETTINGS
@given(
    rows=st.integers(0, 40),
    cols=st.integers(0, 24),
    dtype=st.sampled_from(INT_DTYPES),
    spread=st.sampled_from([1, 3, 1000, None]),
    seed=st.integers(0, 2**32 - 1),
)
def test_l1_chain_matches_reference(rows, cols, dtype, spread, seed):
    info = np.iinfo(dtype)
    # Small spreads force many ties; None spans the whole dtype to catch overflow.
    lo, hi = (max(info.min, -spread), min(info.max, spread)) if spread else (max(info.min, -(2**40)), min(info.max, 2**40))
    m = _rng(seed).integers(lo, hi, (rows, cols), endpoint=True).astype(dtype)
    perm = l1_chain_order(m)
    assert perm.dtype == np.int64
    np.testing.assert_array_equal(perm, l1_chain_order_ref(m))
    assert sorted(perm.tolist()) == list(range(rows))


def test_l1_chain_known_order_and_ties():
    m = np.array([[0], [10], [1], [9]], np.int8)
    # 0 -> row 2 (distance 1) -> row 3 (8) -> row 1 (1).
    assert l1_chain_order(m).tolist() == [0, 2, 3, 1]
    # All rows equal: every step is a tie, so the lowest unused index wins.
    assert l1_chain_order(np.zeros((5, 3), np.int16)).tolist() == [0, 1, 2, 3, 4]


def test_l1_chain_extreme_int16_values_do_not_wrap():
    m = np.array([[-32768, -32768], [32767, 32767], [0, 0]], np.int16)
    assert l1_chain_order(m).tolist() == [0, 2, 1]
    m64 = np.array([[-(2**40)], [2**40], [0]], np.int64)
    assert l1_chain_order(m64).tolist() == [0, 2, 1]


def test_l1_chain_rejects_non_matrix():
    with pytest.raises(ValueError):
        l1_chain_order(np.zeros(5, np.int8))
    with pytest.raises(TypeError):
        l1_chain_order(np.zeros((2, 2), np.float32))


# --- summed code lengths for the entropy fits --------------------------------------------------

from pgolf_pack.kernels.rowcost import offset_pass, offset_pass_ref, row_costs, row_costs_ref  # noqa: E402


@SETTINGS
@given(rows=st.integers(0, 40), cols=st.integers(0, 700), n=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_row_costs_bit_identical_to_numpy(rows, cols, n, seed):
    # Bitwise equality, not closeness: the fits compare these sums, so any reordering of the
    # additions could flip a near tie and change the artifact.
    rng = _rng(seed)
    y = rng.integers(0, n, (rows, cols)).astype(np.int32)
    cst = rng.random((cols, n)) * 10.0 ** rng.uniform(-2, 2, (cols, n))
    assert row_costs(y, cst).tobytes() == row_costs_ref(y, cst).tobytes()


@SETTINGS
@given(rows=st.integers(0, 30), cols=st.integers(0, 400), axis=st.integers(0, 1), window=st.integers(0, 3),
       seed=st.integers(0, 2**32 - 1))
def test_offset_pass_matches_reference(rows, cols, axis, window, seed):
    rng = _rng(seed)
    n, m_n, s_lo, s_hi = 9, 3, -4, 6
    flat = rng.random((s_hi - s_lo + 1) * m_n * n) * 20
    # Exact ties between candidates (same cost table row) must keep the first, as numpy does.
    flat[: m_n * n] = flat[m_n * n: 2 * m_n * n]
    y = rng.integers(0, n, (rows, cols)).astype(np.int32)
    u, v, m = rng.integers(-6, 4, rows), rng.integers(-3, 8, cols), rng.integers(0, m_n, cols)
    line, other = (u, v) if axis == 0 else (v, u)
    got = offset_pass(y, line, other, m, flat, s_lo, s_hi, m_n, window, axis)
    np.testing.assert_array_equal(got, offset_pass_ref(y, line, other, m, flat, s_lo, s_hi, m_n, window, axis))


def test_row_costs_long_rows_use_numpy_pairwise_order():
    # Above 128 elements numpy splits the sum in halves; a sequential sum differs in the last bits.
    rng = _rng(3)
    y = rng.integers(0, 5, (4, 20000)).astype(np.int32)
    cst = rng.random((20000, 5)) * 1e3
    got = row_costs(y, cst)
    assert got.tobytes() == row_costs_ref(y, cst).tobytes()
    seq = np.array([float(np.cumsum(cst[np.arange(20000), r])[-1]) for r in y])
    assert not np.array_equal(seq, got)


# --- context order, escape magnitudes and mantissas for the entropy encoder ----------------------

from pgolf_pack.kernels.ctxsort import (  # noqa: E402
    escape_parts,
    escape_parts_ref,
    pack_mantissas,
    pack_mantissas_ref,
    stable_order,
    stable_order_ref,
)


@SETTINGS
@given(n=st.integers(0, 3000), k=st.integers(1, 70000), seed=st.integers(0, 2**32 - 1))
def test_stable_order_matches_stable_argsort(n, k, seed):
    keys = _rng(seed).integers(0, min(k, 50), n)  # few distinct keys: long runs of ties
    np.testing.assert_array_equal(stable_order(keys, k), stable_order_ref(keys, k))


def test_stable_order_rejects_keys_outside_range():
    with pytest.raises(ValueError):
        stable_order(np.array([0, 3]), 3)


@SETTINGS
@given(n=st.integers(0, 500), top=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_pack_mantissas_matches_reference(n, top, seed):
    rng = _rng(seed)
    buckets = rng.integers(0, top + 1, n)
    mant = np.array([int(rng.integers(0, 1 << int(b))) if b else 0 for b in buckets], dtype=np.int64)
    assert pack_mantissas(buckets, mant) == pack_mantissas_ref(buckets, mant)


@SETTINGS
@given(n=st.integers(0, 300), clo=st.integers(-50, 0), width=st.integers(0, 60), top=st.integers(0, 45),
       seed=st.integers(0, 2**32 - 1))
def test_escape_parts_matches_reference(n, clo, width, top, seed):
    rng = _rng(seed)
    chi = clo + width
    dist = rng.integers(1, 1 << top, n, dtype=np.int64) if top else np.ones(n, np.int64)
    v = np.where(rng.integers(0, 2, n) == 0, clo - dist, chi + dist)
    got, want = escape_parts(v, clo, chi), escape_parts_ref(v, clo, chi)
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def test_escape_parts_bit_lengths():
    # Core [-3, 4]: distances 1, 2, 3, 4 and 2**40 + 5 past either edge.
    v = np.array([-4, 5, -5, 6, 7, 8, -3 - (2**40 + 5)], dtype=np.int64)
    b, m = escape_parts(v, -3, 4)
    assert b.tolist() == [0, 0, 1, 1, 1, 2, 40]
    assert m.tolist() == [0, 0, 0, 0, 1, 0, 5]


# --- ANS stream length, exact and bounded, against constriction ----------------------------------

from pgolf_pack.kernels.anslen import ans_words, ans_words_bounds  # noqa: E402


def _ans_segments(rng, count, max_len):
    segs = []
    for _ in range(count):
        n = int(rng.integers(2, 40))
        p = rng.random(n) ** rng.uniform(1, 8)
        p[rng.random(n) < 0.3] = 2.0**-24  # the coder's floor for absent symbols
        p /= p.sum()
        segs.append((rng.choice(n, int(rng.integers(0, max_len + 1)), p=p).astype(np.int32), p))
    return segs


@SETTINGS
@given(count=st.integers(1, 5), max_len=st.sampled_from([3, 200, 20000]), seed=st.integers(0, 2**32 - 1))
def test_ans_words_exact_and_bounded(count, max_len, seed):
    import constriction

    segs = _ans_segments(_rng(seed), count, max_len)
    coder = constriction.stream.stack.AnsCoder()
    for y, p in reversed(segs):
        coder.encode_reverse(y, constriction.stream.model.Categorical(p, perfect=False))
    real = len(coder.get_compressed())
    assert ans_words(segs) == real
    lo, hi = ans_words_bounds(segs)
    assert lo <= real <= hi
    # Tight enough to rule models out: a few words, plus the allowance each coded symbol carries
    # (its step may move the state by -log2(1 - 2**-8) bits either way however little
    # information it holds, so long runs of a near-certain symbol widen the bounds).
    nsym = sum(len(y) for y, _ in segs)
    assert hi - lo <= 8 + real // 100 + int(np.ceil(nsym * 2 * -np.log2(1 - 2.0**-8) / 32))


# --- Exp-Golomb size of count tables ------------------------------------------------------------

from pgolf_pack.kernels.tablebits import table_bits, table_bits_ref  # noqa: E402


@SETTINGS
@given(n=st.integers(0, 300), top=st.integers(1, 40), zeros=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_table_bits_matches_reference(n, top, zeros, seed):
    rng = _rng(seed)
    t = rng.integers(0, 1 << top, n)
    t[rng.random(n) < zeros] = 0
    assert table_bits(t) == table_bits_ref(t)


def test_table_bits_small_cases():
    # [3]: eg(3, k) costs 5, 4, 3, 4 bits for k = 0..3, so k = 2 and 3 + 5 bits.
    assert table_bits(np.array([3])) == (8, 2)
    # [0, 0, 0]: one zero token eg(0, 0) = 1 bit, the run eg(2, 0) = 3 bits, + 5.
    assert table_bits(np.array([0, 0, 0])) == (9, 0)
    assert table_bits(np.zeros(0, np.int64)) == (5, 0)


@SETTINGS
@given(rows=st.integers(0, 30), cols=st.integers(0, 50), n=st.integers(1, 20), axis=st.integers(0, 1), seed=st.integers(0, 2**32 - 1))
def test_line_hists_matches_reference(rows, cols, n, axis, seed):
    from pgolf_pack.kernels.ctxsort import line_hists, line_hists_ref

    y = _rng(seed).integers(0, n, (rows, cols)).astype(np.int32)
    got = line_hists(y, n, axis)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, line_hists_ref(y, n, axis))


@SETTINGS
@given(rows=st.integers(1, 60), b0=st.integers(0, 59), cols=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_best_prior_rho2_bit_identical(rows, b0, cols, seed):
    from pgolf_pack.kernels.rowcost import best_prior_rho2, best_prior_rho2_ref

    b0 = min(b0, rows - 1)
    x = _rng(seed).integers(-20, 21, (rows, cols))
    x[::7] = 0  # zero rows: the 1e-9 floor
    xf = x.astype(np.float32)
    gram = (xf @ xf[b0:].T).astype(np.float64)
    nrm = (x.astype(np.float64) ** 2).sum(axis=1)
    assert best_prior_rho2(gram, nrm, b0).tobytes() == best_prior_rho2_ref(gram, nrm, b0).tobytes()


# --- fused table code lengths, line costs and moments for the entropy fits ------------------------
# These only steer the fits (libm exp, other summation orders), so they are held to the numpy
# expressions they replace within a few ulps rather than bitwise.

from pgolf_pack.kernels.fitcost import (  # noqa: E402
    LineFit,
    fit_costs,
    fit_costs_ref,
    line_fit_ref,
    line_moments,
    line_moments_ref,
)


@SETTINGS
@given(family=st.sampled_from(["gauss", "laplace"]), q=st.sampled_from([4, 8, 16]), mstep=st.sampled_from([0, 1, 4]),
       clo=st.integers(-300, 0), width=st.integers(0, 600), esc=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_fit_costs_match_numpy_tables(family, q, mstep, clo, width, esc, seed):
    rng = _rng(seed)
    keys = np.stack([rng.integers(-6 * q, 12 * q, 25), rng.integers(-40, 40, 25)], 1)
    got = fit_costs(family, q, mstep, clo, clo + width, esc, keys)
    want = fit_costs_ref(family, q, mstep, clo, clo + width, esc, keys)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-9


@SETTINGS
@given(lines=st.integers(0, 30), n=st.integers(1, 300), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_line_moments_match_numpy(lines, n, density, seed):
    rng = _rng(seed)
    h = rng.integers(0, 50, (lines, n)) * (rng.random((lines, n)) < density)
    values = np.arange(n, dtype=np.float64) - n // 2
    mean, std = line_moments(h, values)
    mean_ref, std_ref = line_moments_ref(h, values)
    # Integer counts times integer values sum exactly in any order, so the means are bitwise equal.
    assert mean.tobytes() == mean_ref.tobytes()
    np.testing.assert_allclose(std, std_ref, rtol=1e-12, atol=1e-300)


# --- row predictor choice of the entropy coder's ref model ----------------------------------------

from pgolf_pack.coding.entropy_models import fit_row_prediction, fit_row_prediction_ref  # noqa: E402


@SETTINGS
@given(rows=st.integers(0, 90), cols=st.integers(0, 40), protos=st.integers(1, 6), block=st.sampled_from([7, 256]),
       seed=st.integers(0, 2**32 - 1))
def test_row_prediction_kernel_matches_numpy(rows, cols, protos, block, seed):
    # Rows built from a few prototypes (scaled, negated, noisy) so every mode gets chosen.
    rng = _rng(seed)
    base = rng.integers(-20, 21, (protos, cols))
    x = base[rng.integers(0, protos, rows)] * rng.choice([-2, -1, 1, 2], (rows, 1)) + rng.integers(-2, 3, (rows, cols))
    x[::5] = rng.integers(-30, 31, x[::5].shape)
    got, want = fit_row_prediction(x, block), fit_row_prediction_ref(x, block)
    for f in ("mode", "gidx", "roff", "coef"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))


@SETTINGS
@given(family=st.sampled_from(["gauss", "laplace"]), mstep=st.sampled_from([0, 2]), tensors=st.integers(1, 3),
       lines=st.integers(0, 12), width=st.integers(0, 60), esc=st.booleans(), window=st.integers(1, 3),
       rounds=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_line_fit_matches_numpy_search(family, mstep, tensors, lines, width, esc, window, rounds, seed):
    # Several tensors through one LineFit, as fit_lines runs them: tables computed for one
    # tensor are reused by the next, and must change nothing.
    rng = _rng(seed)
    q, clo, chi = 8, -width // 2, width - width // 2
    s_min, s_max = -6 * q, 24 * q
    fits = []
    for _ in range(tensors):
        h = rng.integers(0, 30, (lines, chi - clo + 1 + 2 * esc)) * (rng.random((lines, chi - clo + 1 + 2 * esc)) < 0.5)
        s0 = rng.integers(s_min, s_min + 40, lines)  # near the grid's edge: clipped candidates tie
        m = rng.integers(-4, 5, lines) if mstep else np.zeros(lines, np.int64)
        fits.append((h, s0, m))
    fit = LineFit(family, q, mstep, clo, chi, esc)
    for h, s0, m in fits:
        s, best = fit.fit(h, s0, m, s_min, s_max, window, rounds)
        s_ref, best_ref = line_fit_ref(h, s0, m, s_min, s_max, window, rounds, family, q, mstep, clo, chi, esc)
        np.testing.assert_array_equal(s, s_ref)
        np.testing.assert_array_equal(best, best_ref)  # equal sums (a 0 may come out as -0)
