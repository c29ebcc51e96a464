"""The curvature guide and the block replay of the direct sensitivity measurement: fewer scoring
passes, cheaper ones, and the same multipliers as measuring every step with whole passes.

Run: python -m pytest -q tests/test_sensitivity_guide.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import EX_CKPT
from pgolf_pack.calib import load_tokens
from pgolf_pack.calib.adapter import build_model, nll_sum
from pgolf_pack.calib.block_replay import BlockReplay
from pgolf_pack.calib.calibrate import collect_hessians
from pgolf_pack.calib.sensitivity import (GUIDE_SAFETY, _Guide, _weight_and_metric, loss_curvature,
                                          measure_sensitivity, predicted_dloss)
from pgolf_pack.checkpoint import load_checkpoint
from pgolf_pack.quant.ecsq import ecsq_codes, make_grid

CUSTOM_LM = Path(__file__).resolve().parent / "models" / "custom_lm.py"


@pytest.fixture(scope="module")
def example(example_calibrated):
    loaded, hs, counts, toks = example_calibrated
    return loaded, hs, counts, toks[: 2 * 128 + 1]


# At min_dloss 1e-2 on the window the first steps of these matrices change the loss by less (they
# fail), and the estimate puts at least three of them clearly below: a working guide skips those.
SKIPPED_NAMES = ["tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight", "blocks.1.attn.c_v.weight",
                 "blocks.1.mlp.proj.weight", "blocks.2.attn.c_q.weight"]


def _same(a, b):
    assert a.tensor.keys() == b.tensor.keys()
    for n in a.tensor:
        assert a.tensor[n] == b.tensor[n], (n, a.tensor[n], b.tensor[n])


def test_guided_equals_unguided_where_it_skips_only_failing_steps(example):
    loaded, hs, counts, window = example
    kw = dict(seqs=2, seq_len=128, names=SKIPPED_NAMES, min_dloss=1e-2)
    plain = measure_sensitivity(loaded, hs, window, counts, guide=False, reuse_blocks=False, **kw)
    fast = measure_sensitivity(loaded, hs, window, counts, **kw)
    _same(plain, fast)
    assert plain.skipped == 0 and fast.skipped >= 3
    assert fast.forwards == plain.forwards - fast.skipped


def test_no_skips_where_every_prediction_is_large(example):
    # At the default min_dloss every step's predicted change on the example is far above
    # min_dloss / GUIDE_SAFETY: the guide measures exactly what the unguided ladder measures.
    loaded, hs, counts, window = example
    names = ["blocks.0.attn.c_q.weight", "blocks.2.mlp.fc.weight", "blocks.3.attn.proj.weight"]
    kw = dict(seqs=2, seq_len=128, names=names)
    plain = measure_sensitivity(loaded, hs, window, counts, guide=False, reuse_blocks=False, **kw)
    fast = measure_sensitivity(loaded, hs, window, counts, **kw)
    _same(plain, fast)
    assert fast.skipped == 0 and fast.forwards == plain.forwards


def test_guide_rules():
    g = np.zeros(4)
    f = np.ones(4)
    guide = _Guide([(g, f), (g, np.zeros(4))], min_dloss=1e-3)
    small = guide.predict(0, np.full(4, 1e-3))
    assert small == pytest.approx(2e-6) and guide.predict(1, np.ones(4)) is None  # no gradient: no estimate
    assert not guide.skip(small, last=False)  # nothing skipped before a measurement backs the estimate
    guide.check(small, 1.0, last=False)  # outside the band (over 100 × min_dloss): no evidence
    guide.check(1e-3, 2e-3, last=True)  # the last step is not evidence either
    assert not guide.confirmed
    guide.check(1e-3, 2e-3, last=False)
    assert guide.confirmed and guide.skip(small, last=False)
    assert not guide.skip(small, last=True)  # the last step is always measured
    assert not guide.skip(1e-3 / GUIDE_SAFETY, last=False) and not guide.skip(5e-3, last=False)
    guide.check(1e-4, 2e-3, last=False)  # measured 20× the prediction: the estimate fails here
    assert guide.predict(0, np.ones(4)) is None and not guide.skip(0.0, last=False)


class _ScaledBackward(torch.autograd.Function):
    """Identity forward whose backward shrinks gradients: a model whose gradients lie."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e-3


class _LyingGradients(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx):
        return _ScaledBackward.apply(self.inner(idx))


def test_guide_turns_off_where_gradients_do_not_describe_the_loss(example):
    loaded, hs, counts, window = example
    model = _LyingGradients(loaded.module)
    names = ["inner.tok_emb.weight", "inner.blocks.0.attn.c_k.weight", "inner.blocks.1.mlp.proj.weight"]
    hs2 = {f"inner.{k}": v for k, v in hs.items()}
    counts2 = {f"inner.{k}": v for k, v in counts.items()}
    kw = dict(seqs=2, seq_len=128, names=names, min_dloss=1e-2)
    plain = measure_sensitivity(model, hs2, window, counts2, guide=False, **kw)
    fast = measure_sensitivity(model, hs2, window, counts2, **kw)
    _same(plain, fast)
    assert fast.skipped == 0


def test_prediction_bounds_small_measured_changes(example):
    # What GUIDE_SAFETY rests on: in the small-change regime the measured loss change stays
    # within 2× of the (first-order-magnitude + Fisher) prediction.
    loaded, hs, counts, window = example
    model = loaded.module
    t = torch.as_tensor(window.astype(np.int64))
    x, y = t[:-1].view(2, 128), t[1:].view(2, 128)
    names = ["blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight", "blocks.3.attn.c_v.weight"]
    params = dict(model.named_parameters())
    curv = loss_curvature(model, x, y, [params[n] for n in names])

    def score():
        with torch.no_grad():
            return nll_sum(model, x, y, per_token_float64=True)[0] / y.numel()

    base = score()
    for (g, f), name in zip(curv, names):
        p = params[name]
        w, _, prep = _weight_and_metric(name, p.detach(), hs, counts)
        grid = make_grid(w, 0.1, prep, "flat", 1.0)
        wq = (ecsq_codes(w, grid, None) * grid.steps()).astype(np.float32)
        orig = p.detach().clone()
        with torch.no_grad():
            p.copy_(torch.from_numpy(wq))
        dl = score() - base
        with torch.no_grad():
            p.copy_(orig)
        pred = predicted_dloss(g, f, (w - wq).astype(np.float64))
        assert 1e-6 < pred < 1e-2 and dl < 2 * pred, (name, dl, pred)


def test_curvature_gradient_is_the_mean_loss_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20)).double()
    x = torch.randint(0, 20, (3, 5))
    y = torch.randint(0, 20, (3, 5))
    w = model[1].weight
    (g, f), = loss_curvature(model, x, y, [w])
    v = torch.randn_like(w)

    def mean_loss():
        with torch.no_grad():
            return F.cross_entropy(model(x).reshape(-1, 20), y.reshape(-1)).item()

    eps = 1e-5
    with torch.no_grad():
        w += eps * v
        up = mean_loss()
        w -= 2 * eps * v
        down = mean_loss()
        w += eps * v
    assert float((g * v.numpy()).sum()) == pytest.approx((up - down) / (2 * eps), rel=1e-4)
    assert f.shape == tuple(w.shape) and (f >= 0).all() and f.sum() > 0
    assert w.requires_grad  # restored


def _guided_as_unguided(model, example):
    """The guided measurement of ``model`` on SKIPPED_NAMES, checked equal to the unguided one of
    the example's own model."""
    loaded, hs, counts, window = example
    kw = dict(seqs=2, seq_len=128, names=SKIPPED_NAMES, min_dloss=1e-2)
    res = measure_sensitivity(model, hs, window, counts, **kw)
    _same(measure_sensitivity(loaded, hs, window, counts, guide=False, **kw), res)
    return res


def test_inference_mode_caches_only_turn_the_guide_off(example):
    # A rotary table cached under a caller's own inference_mode pass cannot take part in a
    # backward pass; the measurement then runs unguided instead of failing.
    model = build_model(load_checkpoint(EX_CKPT))
    with torch.inference_mode():
        model.module(torch.zeros(1, 128, dtype=torch.long))
    res = _guided_as_unguided(model, example)
    assert res.skipped == 0


def test_guide_works_after_evaluate_bpb_on_the_same_model(example):
    # evaluate_bpb scores under no_grad, so the tables it leaves cached do not switch the guide off.
    from conftest import EX_TOKENIZER, EX_VAL
    from pgolf_pack.calib.bpb import evaluate_bpb

    model = build_model(load_checkpoint(EX_CKPT))
    evaluate_bpb(model, load_tokens(EX_VAL), EX_TOKENIZER, seq_len=128, max_seqs=1)
    res = _guided_as_unguided(model, example)
    assert res.skipped > 0


def _custom_lm():
    spec = importlib.util.spec_from_file_location("custom_lm_for_guide", CUSTOM_LM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(3)
    return mod.TinyLM(vocab=64, dim=32, hidden=64, layers=3).eval()


def test_custom_architecture_guided_and_replayed_equals_plain():
    model = _custom_lm()
    toks = np.random.default_rng(5).integers(0, 64, 4 * 32 + 1)
    x = torch.as_tensor(toks[:-1].reshape(4, 32).astype(np.int64))
    hs, counts = collect_hessians(model, [(x, x)])
    assert "layers.2.ffn.down.weight" in hs and "mix" in hs
    kw = dict(seqs=4, seq_len=32, min_numel=512, min_dloss=3e-3, batch=2)
    plain = measure_sensitivity(model, hs, toks, counts, guide=False, reuse_blocks=False, **kw)
    fast = measure_sensitivity(model, hs, toks, counts, **kw)
    _same(plain, fast)
    assert "mix" in fast.tensor and "head.weight" in fast.tensor and fast.forwards <= plain.forwards
    assert all(v > 0 for v in fast.tensor.values())


def test_replay_is_exact_and_runs_only_what_changed():
    model = _custom_lm()
    x = torch.randint(0, 64, (2, 16))
    x2 = (x + 1) % 64
    cases = [(model.layers[2].out.weight, 1), (model.layers[0].qkv.weight, 3), (model.mix, 0), (model.embed.weight, 3)]
    want = []
    with torch.no_grad():
        base, other = model(x), model(x2)
        orig = {id(w): w.detach().clone() for w, _ in cases}
        for w, _ in cases:
            w.add_(0.01)
            want.append(model(x))
            w.copy_(orig[id(w)])
    with BlockReplay(model) as replay, torch.no_grad():
        assert len(replay.blocks) == 3
        replay.recording(True)
        replay.start_call(0)
        assert torch.equal(model(x), base)
        replay.recording(False)
        for (w, ran), expect in zip(cases, want):
            w.add_(0.01)
            replay.changed([w])
            replay.ran = replay.replayed = 0
            replay.start_call(0)
            got = model(x)
            w.copy_(orig[id(w)])
            assert torch.equal(got, expect)
            assert (replay.ran, replay.replayed) == (ran, 3 - ran)
        # Another batch than the recorded one: nothing to replay.
        replay.changed([])
        replay.ran = replay.replayed = 0
        replay.start_call(1)
        assert torch.equal(model(x2), other) and replay.replayed == 0
    assert "forward" not in model.layers[0].__dict__  # unpatched on exit


class _Reused(nn.Module):
    """One block applied twice, a keyword argument, and an in-place update of a block's output."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

    def forward(self, x, scale=2.0):
        h = self.blocks[0](x)
        h.mul_(scale)  # would corrupt a cached tensor handed out without a copy
        h = self.blocks[0](h)
        return self.blocks[1](input=h)


def test_replay_handles_reuse_keywords_and_in_place_updates():
    torch.manual_seed(1)
    m = _Reused()
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = m(x)
        with BlockReplay(m) as replay:
            replay.recording(True)
            replay.start_call("a")
            m(x)
            replay.recording(False)
            for _ in range(2):
                replay.start_call("a")
                assert torch.equal(m(x), want)
            assert replay.replayed == 2 * 3 and replay.ran == 0
            m.blocks[1].bias.add_(1.0)
            replay.changed([m.blocks[1].bias])
            replay.start_call("a")
            got = m(x)
    assert torch.allclose(got, want + 1.0) and replay.ran == 1
