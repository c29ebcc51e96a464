import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_pack.errors import PgolfError
from pgolf_pack.quant.hadamard import (
    RHT,
    SMALL_ORDERS,
    fwht,
    hadamard_blocks,
    hadamard_matrix,
    hadamard_transform,
    kron_factor,
    random_signs,
    small_hadamard,
)

# Sloane's had.12 as shipped in QuIP#'s lib/utils/matmul_had.py (get_had12).
QUIP_HAD12 = """
+ - - - - - - - - - - -
+ + - + - - - + + + - +
+ + + - + - - - + + + -
+ - + + - + - - - + + +
+ + - + + - + - - - + +
+ + + - + + - + - - - +
+ + + + - + + - + - - -
+ - + + + - + + - + - -
+ - - + + + - + + - + -
+ - - - + + + - + + - +
+ + - - - + + + - + + -
+ - + - - - + + + - + +
"""


def test_fwht_is_sylvester():
    for p in [1, 2, 4, 8, 64, 256]:
        np.testing.assert_array_equal(fwht(np.eye(p)), scipy.linalg.hadamard(p))


def test_small_hadamard_orders():
    assert {12, 20, 28, 36, 60, 108, 140}.issubset(SMALL_ORDERS)
    for k in SMALL_ORDERS:
        h = small_hadamard(k)
        assert set(np.unique(h)) <= {-1, 1}
        np.testing.assert_array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))


def test_h12_matches_quip_table():
    ref = np.array([[1 if c == "+" else -1 for c in row.split()] for row in QUIP_HAD12.strip().splitlines()])
    np.testing.assert_array_equal(small_hadamard(12), ref)


@pytest.mark.parametrize("n,kp", [(512, (1, 512)), (384, (12, 32)), (640, (20, 32)), (768, (12, 64)), (1536, (12, 128))])
def test_field_sizes_are_single_kron_blocks(n, kp):
    assert kron_factor(n) == kp
    assert hadamard_blocks(n) == [kp]


def test_kron_structure():
    m = hadamard_matrix(384)
    np.testing.assert_allclose(m, np.kron(small_hadamard(12), scipy.linalg.hadamard(32)) / np.sqrt(384), atol=1e-13)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 8, 12, 24, 50, 184, 256, 384, 640, 720])
def test_orthogonal(n):
    m = hadamard_matrix(n)
    np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(m.T @ m, np.eye(n), atol=1e-12)
    assert sum(k * p for k, p in hadamard_blocks(n)) == n


def test_block_plan_is_the_largest_factorable_size_first():
    """The plan's definition, stepping down one size at a time, against the direct search; and a
    size a hostile manifest might give is planned at once."""
    def stepped(n):
        blocks, rem = [], n
        while rem:
            size = rem
            while kron_factor(size) is None:
                size -= 1
            blocks.append(kron_factor(size))
            rem -= size
        return blocks

    for n in list(range(1, 1200)) + [12007, 12008, 65537, 99991]:
        assert hadamard_blocks(n) == stepped(n), n
    big = hadamard_blocks(10**12 + 39)
    assert sum(k * p for k, p in big) == 10**12 + 39 and len(big) < 64


def test_fast_transform_equals_dense_on_both_axes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((24, 40))
    m40 = hadamard_matrix(40)
    m24 = hadamard_matrix(24)
    np.testing.assert_allclose(hadamard_transform(x, -1), x @ m40.T, atol=1e-12)
    np.testing.assert_allclose(hadamard_transform(x, 0), m24 @ x, atol=1e-12)
    np.testing.assert_allclose(hadamard_transform(x, -1, transpose=True), x @ m40, atol=1e-12)


def test_signs_reproducible_and_balanced():
    a = random_signs(4096, 7)
    np.testing.assert_array_equal(a, random_signs(4096, 7))
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert abs(a.mean()) < 0.06
    assert not np.array_equal(a, random_signs(4096, 8))
    assert not np.array_equal(a, random_signs(4096, 7, side=1))
    # PCG64 + SeedSequence are specified algorithms: pin the first bits against drift.
    assert random_signs(10, 0).tolist() == [-1, -1, -1, -1, -1, 1, -1, 1, 1, -1]
    with pytest.raises(PgolfError):
        random_signs(4, -1)


def test_rht_matches_matrix_definition_and_inverts():
    rng = np.random.default_rng(2)
    m, n = 48, 384
    w = rng.standard_normal((m, n))
    r = RHT.make(m, n, seed=3)
    expected = hadamard_matrix(m) @ np.diag(r.row_signs) @ w @ np.diag(r.col_signs) @ hadamard_matrix(n).T
    np.testing.assert_allclose(r.forward(w), expected, atol=1e-12)
    np.testing.assert_allclose(r.inverse(r.forward(w)), w, atol=1e-12)
    np.testing.assert_allclose(r.forward(r.inverse(w)), w, atol=1e-12)


def test_rht_hessian_rotation_preserves_proxy_loss():
    rng = np.random.default_rng(3)
    m, n = 20, 96
    x = rng.standard_normal((200, n)) @ rng.standard_normal((n, n))
    h = x.T @ x
    d = rng.standard_normal((m, n))
    r = RHT.make(m, n, seed=1)
    loss = np.trace(d @ h @ d.T)
    np.testing.assert_allclose(np.trace(r.forward(d) @ r.rotate_hessian(h) @ r.forward(d).T), loss, rtol=1e-10)


def test_rht_spreads_an_outlier():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((384, 512))
    w[:, 7] *= 50
    spike = np.abs(w).max() / np.sqrt((w**2).mean())
    wr = RHT.make(384, 512, seed=0).forward(w)
    assert np.abs(wr).max() / np.sqrt((wr**2).mean()) < spike / 5


def test_rht_keeps_float32_and_params_roundtrip():
    w = np.random.default_rng(5).standard_normal((12, 20)).astype(np.float32)
    r = RHT.make(12, 20, seed=9, rows=False)
    assert r.forward(w).dtype == np.float32
    r2 = RHT.from_params(12, 20, r.to_params())
    assert r2 == r
    np.testing.assert_allclose(r2.inverse(r.forward(w)), w, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 70), seed=st.integers(0, 2**32))
def test_rht_roundtrip_property(m, n, seed):
    w = np.random.default_rng(seed).standard_normal((m, n))
    r = RHT.make(m, n, seed)
    y = r.forward(w)
    np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(w), rtol=1e-12)
    np.testing.assert_allclose(r.inverse(y), w, atol=1e-12)
