"""Equal-slope allocation, the rate model and budgets met on real packed bytes.

Run: python -m pytest -q tests/test_allocate.py
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_state_dict
from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import group_choices, pack_model, unpack_model
from pgolf_pack.quant.allocate import (
    SLOPE,
    RDConfig,
    allocate_steps,
    fit_budget,
    predict_bytes,
    prepare_model,
    proxy_error,
    quantize_model_rd,
    step_for,
)
from pgolf_pack.quant.base import dequantize_float32


def hessians_for(sd, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in sd.items():
        if t.dim() == 2 and t.numel() >= 4096:
            cols = t.shape[1]
            x = rng.standard_normal((3 * cols, cols)) * np.exp(rng.normal(0, 1.0, cols))
            out[name] = (x.T @ x).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def small():
    sd = make_state_dict(seed=3, layers=2, dim=64, vocab=256)
    return sd, hessians_for(sd)


def test_steps_have_equal_slope(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"), sensitivity={"blocks.*.mlp.*": 4.0, "tok_emb.weight": 2.0})
    assert {t.name: t.sens for t in mp.tensors}["tok_emb.weight"] == 2.0
    assert mp.info("blocks.0.mlp.fc.weight").sens == 4.0 and mp.info("blocks.1.attn.c_q.weight").sens == 1.0
    for lam in (1e-4, 3e-2):
        for info in mp.tensors:
            d = step_for(info, lam)
            assert np.isclose(d * d * info.k * info.sens, SLOPE * lam)
    with pytest.raises(PgolfError):
        step_for(mp.tensors[0], 0.0)


def test_larger_lambda_means_fewer_bytes_and_more_error(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="rdoq"))
    sizes, errs = [], []
    for lam in (1e-5, 1e-4, 1e-3):
        qm = quantize_model_rd(mp, lam)
        sizes.append(len(pack_model(qm, codec="entropy").blob))
        errs.append(sum(proxy_error(mp, qm).values()))
    assert sizes[0] > sizes[1] > sizes[2]
    assert errs[0] < errs[1] < errs[2]


@pytest.mark.parametrize("cfg", [RDConfig(method="ecsq", row_mode="std", col_beta=0.0), RDConfig(method="rdoq"),
                                 RDConfig(method="trellis"), RDConfig(method="trellis", trellis_coding="split")],
                         ids=["ecsq", "rdoq", "trellis", "trellis-split"])
def test_rate_model_predicts_coded_bytes(small, cfg):
    sd, hs = small
    mp = prepare_model(sd, hs, cfg)
    for lam in (3e-5, 1e-3):
        qm = quantize_model_rd(mp, lam)
        real = len(pack_model(qm, codec="entropy").blob)
        pred = predict_bytes(qm)
        assert abs(pred - real) <= 0.005 * real, (pred, real)


@settings(max_examples=4, deadline=None)
@given(frac=st.floats(0.35, 0.9), method=st.sampled_from(["ecsq", "rdoq", "trellis"]))
def test_budget_is_never_exceeded(small, frac, method):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method=method))
    top = len(pack_model(quantize_model_rd(mp, 1e-6), codec="entropy").blob)
    budget = int(frac * top)
    res = fit_budget(mp, budget, codec="entropy", max_iter=8)
    assert res.bytes <= budget
    assert all(p.bytes <= budget for p in res.history if p.lam == res.lam)
    assert res.bytes == max(p.bytes for p in res.history if p.bytes <= budget)
    back, manifest = unpack_model(res.pack.blob)
    assert pack_model(back, codec="entropy", choices=group_choices(manifest)).blob == res.pack.blob
    for a, b in zip(res.qm.tensors, back.tensors):
        np.testing.assert_array_equal(dequantize_float32(a), dequantize_float32(b))


def test_code_bytes_count_against_the_budget(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"))
    budget = len(pack_model(quantize_model_rd(mp, 1e-4), codec="entropy").blob)
    res = fit_budget(mp, budget, codec="entropy", extra_bytes=5000, max_iter=8)
    assert res.bytes + 5000 <= budget


def test_unmeetable_budget_says_by_how_much(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"))
    with pytest.raises(PgolfError, match="cannot be met"):
        fit_budget(mp, 2000, codec="entropy", max_iter=3)  # float tensors alone are larger


def test_without_hessians_column_steps_are_off(small):
    sd, _ = small
    mp = prepare_model(sd, None, RDConfig(method="rdoq"))
    qm = quantize_model_rd(mp, 1e-4)
    assert all("colexp" not in t.streams for t in qm.tensors)
    steps = allocate_steps(mp, 1e-4)
    assert set(steps) == {t.name for t in mp.tensors}


def test_missing_hessian_is_an_error(small):
    sd, hs = small
    partial = dict(list(hs.items())[1:])
    with pytest.raises(PgolfError, match="no entry"):
        prepare_model(sd, partial, RDConfig())
