import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import pack_model, unpack_model
from pgolf_pack.quant.base import QuantizedModel, dequantize_float32
from pgolf_pack.quant.lqer import (
    STREAMS,
    apply_lqer,
    code_range,
    dequantize_factor,
    fit_lqer,
    quantize_factor,
    strip_lqer,
    weighted_error,
)
from pgolf_pack.quant.mixed_rows import quantize_mixed_rows
from pgolf_pack.quant.rtn import quantize_rtn


def _weights(rng, shapes, lowrank=4):
    """Gaussian weights plus a low-rank part, so the quantization error has some structure."""
    out = {}
    for i, (r, c) in enumerate(shapes):
        lr = rng.standard_normal((r, lowrank)) @ rng.standard_normal((lowrank, c)) * 0.03
        out[f"blocks.{i}.mlp.fc.weight"] = (rng.standard_normal((r, c)) * 0.05 + lr).astype(np.float32)
    return out


def _quantize(ws, bits=4):
    return QuantizedModel([quantize_rtn(k, v, "float32", bits, "sdclip") for k, v in ws.items()])


def _hessian(rng, cols, n=400):
    x = rng.standard_normal((n, cols)) * np.geomspace(0.05, 4.0, cols)[None, :]
    return x.T @ x


def _repack(qm):
    blob = pack_model(qm, codec="auto-fast").blob
    return unpack_model(blob)[0]


# --- factor quantization ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 200), st.integers(1, 8), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_factor_codes_in_range_and_error_bounded(r, n, bits, group, seed):
    x = np.random.default_rng(seed).standard_normal((r, n)) * 3
    q, s = quantize_factor(x, bits, group)
    lo, hi = code_range(bits)
    assert q.dtype == np.int8 and q.shape == (r, n) and s.shape == (r, -(-n // group))
    assert q.min() >= lo and q.max() <= hi
    xh = dequantize_factor(q, s, group)
    # Unclipped values round to the nearest mid-rise level: within half a step.
    step = np.repeat(s.astype(np.float64), group, axis=1)[:, :n]
    inside = np.abs(x) <= (hi + 0.5) * step
    assert np.all(np.abs(xh - x)[inside] <= 0.5 * step[inside] * (1 + 1e-3) + 1e-6)


def test_factor_scale_search_beats_absmax():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 640))
    x[0, 5] = 12.0  # one outlier per group makes the absmax scale coarse
    q, s = quantize_factor(x, 3, 64)
    lo, hi = code_range(3)
    s_abs = (np.abs(x).reshape(2, -1, 64).max(axis=2) / (hi + 0.5)).astype(np.float16)
    q_abs = np.clip(np.floor(x / np.repeat(s_abs.astype(np.float64), 64, axis=1)), lo, hi)
    err = ((dequantize_factor(q, s, 64) - x) ** 2).sum()
    err_abs = ((dequantize_factor(q_abs.astype(np.int8), s_abs, 64) - x) ** 2).sum()
    assert err < err_abs


def test_exact_low_rank_error_is_recovered():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((96, 3)) @ rng.standard_normal((3, 80))
    f = fit_lqer(e, rank=3, bits=8, group=32)
    approx = dequantize_factor(f["A"], f["sA"], 32).T @ dequantize_factor(f["B"], f["sB"], 32)
    assert ((e - approx) ** 2).sum() < 1e-3 * (e**2).sum()


def test_rank_is_clamped_to_the_matrix():
    e = np.random.default_rng(1).standard_normal((5, 40))
    f = fit_lqer(e, rank=9, bits=4, group=16)
    assert f["A"].shape == (5, 5) and f["B"].shape == (5, 40)


# --- apply_lqer ------------------------------------------------------------------------------------


def test_reduces_error_of_chosen_tensors_and_picks_the_worst():
    rng = np.random.default_rng(1)
    ws = _weights(rng, [(128, 64), (96, 64), (64, 64)])
    ws["blocks.1.mlp.fc.weight"] *= 3  # the most damaged tensor by ‖E‖²
    qm = _quantize(ws)
    before = {t.name: dequantize_float32(t) for t in qm.tensors}
    rows = apply_lqer(qm, {k: torch.from_numpy(v) for k, v in ws.items()}, None, top_k=2, rank=4)
    assert [r["name"] for r in rows][0] == "blocks.1.mlp.fc.weight"
    assert len(rows) == 2 and rows[0]["score"] >= rows[1]["score"]
    for r in rows:
        t = qm[r["name"]]
        assert r["err_after"] < r["err_before"]
        assert r["werr_before"] is None
        assert r["factor_bytes"] == sum(t.streams[k].data.nbytes for k in STREAMS)
        d = ws[r["name"]] - dequantize_float32(t)
        assert np.isclose((d.astype(np.float64) ** 2).sum(), r["err_after"], rtol=1e-4)
    untouched = [n for n in ws if n not in {r["name"] for r in rows}]
    assert untouched and all("lqer" not in qm[n].params for n in untouched)
    for n in untouched:
        np.testing.assert_array_equal(dequantize_float32(qm[n]), before[n])


@pytest.mark.parametrize("weighted", [False, "diag", "chol"])
def test_hessian_score_and_weighted_error_drop(weighted):
    rng = np.random.default_rng(2)
    ws = _weights(rng, [(128, 48), (64, 48)])
    hs = {k: _hessian(rng, 48) for k in ws}
    qm = _quantize(ws)
    rows = apply_lqer(qm, ws, hs, top_k=2, rank=4, bits=6, weighted=weighted, score="weighted")
    for r in rows:
        assert r["werr_after"] < r["werr_before"]
        e = ws[r["name"]].astype(np.float64) - dequantize_float32(strip_lqer(qm[r["name"]]))
        assert np.isclose(r["score"], weighted_error(e, hs[r["name"]]))
        if weighted is False:
            assert r["err_after"] < r["err_before"]


def test_relative_score_is_scale_free():
    rng = np.random.default_rng(9)
    ws = _weights(rng, [(64, 32), (64, 32)])
    ws["blocks.0.mlp.fc.weight"] *= 10  # int6: small relative error, large absolute one
    hs = {k: _hessian(rng, 32) for k in ws}

    def quantized():
        return QuantizedModel([quantize_rtn(n, ws[n], "float32", b, "sdclip")
                               for n, b in (("blocks.0.mlp.fc.weight", 6), ("blocks.1.mlp.fc.weight", 3))])

    assert apply_lqer(quantized(), ws, hs, top_k=1, rank=1, score="plain")[0]["name"] == "blocks.0.mlp.fc.weight"
    rows = apply_lqer(quantized(), ws, hs, top_k=2, rank=1, score="relative")
    assert rows[0]["name"] == "blocks.1.mlp.fc.weight"
    assert apply_lqer(quantized(), ws, hs, top_k=1, rank=1)[0]["name"] == "blocks.1.mlp.fc.weight"  # auto
    for r in rows:
        assert np.isclose(r["score"], r["werr_before"] / weighted_error(ws[r["name"]], hs[r["name"]]))


def test_activation_weighted_fit_wins_on_weighted_error():
    rng = np.random.default_rng(4)
    ws = _weights(rng, [(160, 64)], lowrank=0)
    hs = {k: _hessian(rng, 64) for k in ws}
    res = {}
    for mode in ("none", "chol"):
        qm = _quantize(ws, bits=3)
        res[mode] = apply_lqer(qm, ws, hs, top_k=1, rank=6, bits=8, weighted=mode)[0]
    assert res["chol"]["werr_after"] < 0.98 * res["none"]["werr_after"]
    assert res["none"]["err_after"] < res["chol"]["err_after"]


def test_reapplying_replaces_rather_than_stacks():
    rng = np.random.default_rng(5)
    ws = _weights(rng, [(64, 64)])
    qm = _quantize(ws)
    first = apply_lqer(qm, ws, None, top_k=1, rank=2)[0]
    again = apply_lqer(qm, ws, None, top_k=1, rank=2)[0]
    assert again["err_before"] == pytest.approx(first["err_before"])
    assert again["err_after"] == pytest.approx(first["err_after"])


def test_correction_stacks_on_another_scheme():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((120, 32)).astype(np.float32)
    qt = quantize_mixed_rows("tok_emb.weight", w, "float32", "20%:6,rest:3", rng.random(120))
    qm = QuantizedModel([qt])
    row = apply_lqer(qm, {"tok_emb.weight": w}, None, top_k=1, rank=3)[0]
    assert row["err_after"] < row["err_before"]
    back = _repack(qm)
    np.testing.assert_array_equal(dequantize_float32(back["tok_emb.weight"]), dequantize_float32(qt))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"rank": 0}, "rank"),
        ({"bits": 9}, "bits"),
        ({"bits_a": 0}, "bits"),
        ({"group": 0}, "group"),
        ({"weighted": True}, "Hessian"),
        ({"weighted": "awq"}, "weighting"),
        ({"names": ["nope"]}, "nope"),
        ({"top_k": -1}, "top_k"),
        ({"kind": "blob"}, "kind"),
        ({"score": "bogus"}, "score"),
        ({"score": "relative"}, "needs Hessians"),
    ],
)
def test_bad_arguments_raise_pgolf_error(kwargs, msg):
    rng = np.random.default_rng(7)
    ws = _weights(rng, [(64, 64)])
    args = {"top_k": 1, "rank": 2, **kwargs}
    with pytest.raises(PgolfError, match=msg):
        apply_lqer(_quantize(ws), ws, None, **args)


def test_missing_hessian_and_original_are_named():
    rng = np.random.default_rng(8)
    ws = _weights(rng, [(64, 64), (64, 64)])
    qm = _quantize(ws)
    with pytest.raises(PgolfError, match="blocks.1.mlp.fc.weight"):
        apply_lqer(qm, ws, {"blocks.0.mlp.fc.weight": np.eye(64)}, top_k=1, rank=2)
    with pytest.raises(PgolfError, match="no original"):
        apply_lqer(qm, {"blocks.0.mlp.fc.weight": ws["blocks.0.mlp.fc.weight"]}, None, top_k=1, rank=2)


# --- through the real packer -----------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.tuples(st.integers(2, 80), st.integers(2, 90)), min_size=1, max_size=3),
    rank=st.integers(1, 6),
    bits=st.integers(1, 8),
    bits_a=st.one_of(st.none(), st.integers(1, 8)),
    group=st.sampled_from([8, 32, 64, 100]),
    kind=st.sampled_from(["symbols", "side"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_roundtrip_is_exact(shapes, rank, bits, bits_a, group, kind, seed):
    rng = np.random.default_rng(seed)
    ws = _weights(rng, shapes, lowrank=1)
    qm = _quantize(ws)
    apply_lqer(qm, ws, None, top_k=len(ws), rank=rank, bits=bits, group=group, bits_a=bits_a, kind=kind)
    back = _repack(qm)
    for t in qm.tensors:
        assert back[t.name].params["lqer"] == t.params["lqer"]
        np.testing.assert_array_equal(dequantize_float32(back[t.name]), dequantize_float32(t))
