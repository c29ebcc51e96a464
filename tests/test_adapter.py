"""The model adapter and its Python API twins: load_model, collect_hessians, measure_sensitivity,
evaluate_bpb, for the reference GPT and for models of other shapes and conventions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_state_dict
from pgolf_pack.calib import build_model, calibration_batches, collect_hessians, evaluate_bpb, load_model, measure_sensitivity
from pgolf_pack.calib.adapter import ModelSpec, nll_sum, parse_tied_head
from pgolf_pack.calib.hessian import HessianCollector
from pgolf_pack.calib.sensitivity import fisher_sensitivity
from pgolf_pack.errors import PgolfError

EX = Path(__file__).resolve().parents[1] / "examples"
MODELS = Path(__file__).resolve().parent / "models"
CUSTOM_LM = (MODELS / "custom_lm.py").read_text()
TRAIN_GPT = (MODELS / "train_gpt.py").read_text()
SP = EX / "tiny_sp512.model"


def synthetic_hessians(sd, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in sd.items():
        if t.dim() == 2 and t.numel() >= 4096:
            x = rng.standard_normal((3 * t.shape[1], t.shape[1]))
            out[name] = (x.T @ x).astype(np.float32)
    return out


class MeanLoss(nn.Module):
    """The challenge's convention around a logits model: forward(input_ids, target_ids) -> mean loss."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, target_ids):
        logits = self.inner(input_ids)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target_ids.reshape(-1))


@pytest.fixture(scope="module")
def reference():
    sd = make_state_dict(seed=4, layers=2, dim=64, vocab=512)
    tokens = np.random.default_rng(0).integers(0, 512, 4 * 64 + 1)
    return sd, synthetic_hessians(sd), tokens


def test_sensitivity_reference_and_fisher_estimate(reference):
    sd, hs, tokens = reference
    s = fisher_sensitivity(sd, hs, None, tokens, seqs=2, seq_len=64)
    assert set(s.tensor) == set(hs)
    assert all(np.isfinite(v) and v > 0 for v in s.tensor.values())
    assert s.rows["tok_emb.weight"].shape == (512,) and s.rows["blocks.0.mlp.fc.weight"].shape == (128,)
    assert s.tokens == 128
    with pytest.raises(PgolfError):
        fisher_sensitivity(sd, hs, None, tokens[:10], seqs=2, seq_len=64)
    p = measure_sensitivity(load_model(sd), hs, tokens, seqs=2, seq_len=64, min_dloss=0.0)
    assert set(p.tensor) == set(hs) and all(v >= 0 and np.isfinite(v) for v in p.tensor.values())
    with pytest.raises(PgolfError, match="need more than 64 tokens"):
        measure_sensitivity(load_model(sd), hs, tokens[:10], seqs=2, seq_len=64)


def test_sensitivity_measures_what_quantize_quantizes(reference):
    sd, hs, tokens = reference
    model = load_model(sd)
    small = {k: v for k, v in hs.items() if sd[k].numel() < 8192}  # c_q, c_k, c_v, proj: 64×64 or 32×64
    big = measure_sensitivity(model, hs, tokens, seqs=1, seq_len=64, min_numel=8192, min_dloss=0.0)
    assert set(big.tensor) == set(hs) - set(small) and small
    # The weights are restored after each measurement.
    assert all(torch.equal(v.float(), model.state_dict()[k]) for k, v in sd.items())


def test_loss_and_logits_conventions_score_the_same(reference):
    sd, hs, tokens = reference
    logits_model = load_model(sd)
    loss_model = MeanLoss(load_model(sd))
    x = torch.from_numpy(tokens[:128].reshape(2, 64))
    y = torch.from_numpy(tokens[1:129].reshape(2, 64))
    a, vocab = nll_sum(logits_model, x, y)
    b, none = nll_sum(loss_model, x, y)
    assert vocab == 512 and none is None and b == pytest.approx(a, rel=1e-6)
    sa = measure_sensitivity(logits_model, hs, tokens, seqs=2, seq_len=64, min_dloss=0.0)
    sb = measure_sensitivity(loss_model, {f"inner.{k}": v for k, v in hs.items()}, tokens, seqs=2, seq_len=64,
                             min_dloss=0.0)
    for k, v in sa.tensor.items():
        assert sb.tensor[f"inner.{k}"] == pytest.approx(v, rel=0.05, abs=1e-9)
    val = np.random.default_rng(1).integers(0, 512, 3 * 64 + 1)
    ra = evaluate_bpb(logits_model, val, SP, seq_len=64)
    rb = evaluate_bpb(loss_model, val, SP, seq_len=64)
    assert rb["bpb"] == pytest.approx(ra["bpb"], rel=1e-6) and rb["bytes"] == ra["bytes"]


def test_fn_linear_and_tied_head_hessians_match_direct_products():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    w = nn.Parameter(torch.randn(24, 16))
    lin = nn.Linear(24, 16, bias=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.w, self.lin = emb, w, lin

        def forward(self, idx, _targets=None):
            x = self.emb(idx)
            h = torch.relu(F.linear(x, self.w))
            return F.linear(self.lin(h), self.emb.weight)  # tied head through F.linear

    m = M()
    idx = torch.randint(0, 50, (3, 7))
    H, counts = collect_hessians(m, [(idx, idx)])
    x = emb(idx).reshape(-1, 16).detach().double()
    h = torch.relu(F.linear(emb(idx), w)).reshape(-1, 24).detach().double()
    z = lin(torch.relu(F.linear(emb(idx), w))).reshape(-1, 16).detach().double()
    np.testing.assert_allclose(H["w"], (x.T @ x).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(H["lin.weight"], (h.T @ h).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(H["emb.weight"], (z.T @ z).numpy(), rtol=1e-5, atol=1e-4)
    assert counts == {"lin.weight": 21, "w": 21, "emb.weight": 21}
    # Without the interception (HessianCollector's default) only the Linear module is seen.
    with HessianCollector(m) as hc:
        m(idx)
    assert set(hc.hessians()) == {"lin.weight"}


def test_lookup_only_embedding_gets_the_identity():
    emb = nn.Embedding(40, 8)
    head = nn.Linear(8, 40)
    model = nn.Sequential(emb, head)
    idx = torch.randint(0, 40, (2, 10))
    H, counts = collect_hessians(model, [idx])  # one (batch, seq + 1) tensor: inputs and targets
    assert counts["0.weight"] == 2 * 9 and counts["1.weight"] == 2 * 9
    np.testing.assert_array_equal(H["0.weight"], np.eye(8) * (18 / 40))


def test_reference_tied_head_hook_equals_the_fn_linear_capture():
    sd = make_state_dict(seed=2, layers=2, dim=64, vocab=512)
    tokens = np.random.default_rng(3).integers(0, 512, 2000)
    batches = calibration_batches(tokens, n_seqs=4, seq_len=64, batch_seqs=2)
    loaded = build_model(sd)
    assert loaded.tied_head == {"final_norm": "tok_emb.weight"}
    hooked, c1 = collect_hessians(loaded, batches)
    traced, c2 = collect_hessians(loaded.module, batches)  # no tied_head: found from F.linear
    assert c1 == c2 and set(hooked) == set(traced)
    for k in hooked:
        np.testing.assert_array_equal(hooked[k], traced[k])


def test_script_with_hyperparameters_object_constructor(tmp_path, monkeypatch):
    """A GPT(h) constructor (later records) is given the Hyperparameters object itself."""
    src = tmp_path / "train_h.py"
    src.write_text(
        "import os\nimport torch\nfrom torch import nn\n"
        "class Hyperparameters:\n"
        "    vocab_size = int(os.environ.get('VOCAB_SIZE', 32))\n"
        "    model_dim = int(os.environ.get('MODEL_DIM', 8))\n"
        "class GPT(nn.Module):\n"
        "    def __init__(self, h):\n"
        "        super().__init__()\n"
        "        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)\n"
        "        self.lm_head = nn.Linear(h.model_dim, h.vocab_size, bias=False)\n"
        "    def forward(self, input_ids, target_ids):\n"
        "        return self.lm_head(self.tok_emb(input_ids))\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('training must not run on import')\n")
    monkeypatch.setenv("MODEL_DIM", "12")
    sd = {"tok_emb.weight": torch.randn(32, 12), "lm_head.weight": torch.randn(32, 12)}
    loaded = build_model(sd, ModelSpec.parse(str(src)))
    assert loaded.settings == {"vocab_size": 32, "model_dim": 12}
    assert loaded.describe() == "GPT from train_h.py (vocab_size=32, model_dim=12)"
    assert torch.equal(loaded.module.lm_head.weight, sd["lm_head.weight"])


def test_load_model_api_with_a_factory(tmp_path):
    src = tmp_path / "custom_lm.py"
    src.write_text(CUSTOM_LM)
    ns: dict = {}
    exec(CUSTOM_LM, ns)
    sd = ns["TinyLM"](64, dim=16, hidden=32, layers=1).state_dict()
    ckpt = tmp_path / "c.pt"
    torch.save(sd, ckpt)
    model = load_model(ckpt, model=f"{src}:make_model")
    assert not model.training and torch.equal(model.state_dict()["head.weight"], sd["head.weight"])
    (tmp_path / "bad.py").write_text(CUSTOM_LM + "\ndef renamed(sd, device):\n"
                                     "    m = make_model(sd, device)\n    m.extra = torch.nn.Linear(2, 2)\n    return m\n"
                                     "def not_a_module(sd, device):\n    return sd\n")
    with pytest.raises(PgolfError, match=r"does not load strictly into renamed\(\) from bad.py \(missing extra.weight, "
                       r"extra.bias\)"):
        load_model(sd, model=f"{tmp_path / 'bad.py'}:renamed")
    with pytest.raises(PgolfError, match="returned dict, not a torch.nn.Module"):
        load_model(sd, model=f"{tmp_path / 'bad.py'}:not_a_module")


def test_script_import_errors(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nx = 1\nraise RuntimeError('no data dir')\n")
    with pytest.raises(PgolfError, match=r"importing broken.py failed \(line 3\): RuntimeError: no data dir"):
        load_model({}, model=str(broken))
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(PgolfError, match="called sys.exit"):
        load_model({}, model=str(exits))
    script = tmp_path / "train_gpt.py"
    script.write_text(TRAIN_GPT.replace("tied_embed_init_std=0.02", "tied_embed_init_std"))
    with pytest.raises(PgolfError, match=r"GPT\(tied_embed_init_std\): no default and no attribute"):
        load_model({}, model=str(script))


@pytest.mark.parametrize("model, cls, text", [
    (None, "GPT", "--model-class needs --model"),
    ("x.txt", None, "expected a Python file"),
    ("{d}/m.py:not-a-name", None, "is not a Python function name"),
    ("{d}/m.py:f", "GPT", "not both"),
])
def test_model_spec_errors(tmp_path, model, cls, text):
    (tmp_path / "m.py").write_text("")
    with pytest.raises(PgolfError, match=text):
        ModelSpec.parse(model and model.format(d=tmp_path), cls)


def test_tied_head_option():
    assert parse_tied_head("final_norm=tok_emb.weight") == {"final_norm": "tok_emb.weight"}
    assert parse_tied_head(None) is None
    with pytest.raises(PgolfError, match="MODULE=WEIGHT"):
        parse_tied_head("final_norm")


def test_api_twins_at_the_end_of_a_training_script(tmp_path):
    """The README's Python path, on the bundled example: what a user calls with a model in hand."""
    import json

    from pgolf_pack.calib import load_tokens
    from pgolf_pack.calib.hessian import load_hessians, save_hessians

    model = load_model(EX / "tiny_gpt.safetensors")
    train = load_tokens(str(EX / "tiny_train_*.bin"))
    H, counts = collect_hessians(model, calibration_batches(train, n_seqs=2, seq_len=64))
    assert len(H) == 4 * 6 + 1 and set(counts.values()) == {128}  # the tied head found by its F.linear call
    save_hessians(tmp_path / "H.safetensors", H, counts)
    sens = measure_sensitivity(model, *load_hessians(tmp_path / "H.safetensors")[:1], train[: 64 + 1], counts,
                               seqs=1, seq_len=64)
    assert set(sens.to_json()) == set(H) and json.dumps(sens.to_json())
    res = evaluate_bpb(model, load_tokens(str(EX / "tiny_val_*.bin")), SP, seq_len=64, max_seqs=2)
    assert res["tokens"] == 128 and 1.0 < res["bpb"] < 4.0
