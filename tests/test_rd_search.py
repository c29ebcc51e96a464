"""The searches above quant/ and pack/: the byte predictor and the λ search that meets a budget
on real packed bytes.

Run: python -m pytest -q tests/test_rd_search.py
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import hessians_for, lam_at, make_state_dict
from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import group_choices, pack_model, unpack_model
from pgolf_pack.quant.allocate import RDConfig, prepare_model, quantize_model_rd
from pgolf_pack.quant.base import dequantize_float32
from pgolf_pack.rd_search import fit_budget, predict_bytes


@pytest.fixture(scope="module")
def small():
    sd = make_state_dict(seed=3, layers=1, dim=64, vocab=256)
    return sd, hessians_for(sd)


@pytest.mark.parametrize("cfg", [RDConfig(method="ecsq", row_mode="std", col_beta=0.0), RDConfig(method="rdoq"),
                                 RDConfig(method="trellis"), RDConfig(method="trellis", trellis_coding="split")],
                         ids=["ecsq", "rdoq", "trellis", "trellis-split"])
def test_rate_model_predicts_coded_bytes(small, cfg):
    sd, hs = small
    mp = prepare_model(sd, hs, cfg)
    qm = quantize_model_rd(mp, lam_at(mp, 0.35))
    real = len(pack_model(qm, codec="entropy").blob)
    pred = predict_bytes(qm)
    assert abs(pred - real) <= 0.005 * real, (pred, real)


@settings(max_examples=5, deadline=None)
@given(frac=st.floats(0.45, 0.95), method=st.sampled_from(["ecsq", "rdoq", "trellis"]))
def test_budget_is_never_exceeded(small, frac, method):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method=method))
    top = len(pack_model(quantize_model_rd(mp, lam_at(mp, 0.15)), codec="zstd").blob)
    budget = int(frac * top)
    # zstd keeps this fast; the search only ever sees real packed bytes, whatever the codec.
    res = fit_budget(mp, budget, codec="zstd", max_iter=7)
    assert res.bytes <= budget
    assert all(p.bytes <= budget for p in res.history if p.lam == res.lam)
    assert res.bytes == max(p.bytes for p in res.history if p.bytes <= budget)
    back, manifest = unpack_model(res.pack.blob)
    assert pack_model(back, codec="zstd", choices=group_choices(manifest)).blob == res.pack.blob
    for a, b in zip(res.qm.tensors, back.tensors):
        np.testing.assert_array_equal(dequantize_float32(a), dequantize_float32(b))


def test_budget_search_stops_once_within_tolerance(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"))
    budget = len(pack_model(quantize_model_rd(mp, lam_at(mp, 0.3)), codec="zstd").blob)
    res = fit_budget(mp, budget, codec="zstd", max_iter=12, rel_tol=0.05)
    assert budget * 0.95 <= res.bytes <= budget
    # Every probe but the last left the best fit outside the tolerance: no pack is wasted.
    for i in range(1, len(res.history)):
        fits = [p.bytes for p in res.history[:i] if p.bytes <= budget]
        assert not fits or budget - max(fits) > 0.05 * budget
    assert len(res.history) < 12


def test_code_bytes_count_against_the_budget(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"))
    budget = len(pack_model(quantize_model_rd(mp, lam_at(mp, 0.3)), codec="zstd").blob)
    res = fit_budget(mp, budget, codec="zstd", extra_bytes=5000, max_iter=6)
    assert res.bytes + 5000 <= budget


def test_unmeetable_budget_says_by_how_much(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"))
    with pytest.raises(PgolfError, match="cannot be met"):
        fit_budget(mp, 2000, codec="zstd", max_iter=3)  # float tensors alone are larger


@pytest.fixture(scope="module")
def example_prep():
    from conftest import EX_CKPT, EX_TRAIN
    from pgolf_pack.calib import load_tokens
    from pgolf_pack.calib.adapter import build_model
    from pgolf_pack.calib.calibrate import calibration_batches, collect_hessians
    from pgolf_pack.checkpoint import load_checkpoint

    sd = load_checkpoint(EX_CKPT)
    hs, counts = collect_hessians(build_model(sd), calibration_batches(load_tokens(EX_TRAIN), 8, 256))
    return prepare_model(sd, hs, RDConfig(method="ecsq"), counts)


@pytest.mark.parametrize("budget", [180_000, 240_000])
def test_budget_search_on_predicted_bytes_packs_at_most_three_times(example_prep, budget):
    """The bundled example, entropy-coded: λ is searched on predicted bytes, and only a few
    real packs settle it within the default 0.2% of the budget, never over it."""
    res = fit_budget(example_prep, budget, codec="entropy")
    assert res.bytes <= budget
    assert budget - res.bytes <= 0.002 * budget, [p.bytes for p in res.history]
    assert len(res.history) <= 3, [p.bytes for p in res.history]
    assert res.probes > len(res.history)  # the search itself quantized without packing
    assert len(pack_model(res.qm, codec="entropy").blob) == res.bytes


def test_rate_proxy_tracks_real_bytes_within_a_few_percent(small):
    from pgolf_pack.rd_search import rate_proxy

    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"))
    ratios = []
    for delta in (0.2, 0.35, 0.6):
        qm = quantize_model_rd(mp, lam_at(mp, delta))
        ratios.append(len(pack_model(qm, codec="entropy").blob) / rate_proxy(qm))
    assert max(ratios) / min(ratios) < 1.05, ratios
