import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.numpy import save_file
from torch import nn

from pgolf_pack.calib.hessian import (
    HessianCollector,
    check_hessians_match,
    load_hessians,
    load_hessians_with_meta,
    save_hessians,
)
from pgolf_pack.errors import PgolfError


class CastedLinear(nn.Linear):
    """Like the records' layer: keeps fp32 weights, computes in the input's dtype."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class BareLinear(nn.Module):
    """A linear layer that is not an nn.Linear subclass."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) * 0.1)

    def forward(self, x):
        return x @ self.weight.T


class Gate(nn.Module):
    """Has a 2-D weight but does not use it as x @ W.T (its input is a different width)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return x * self.weight.sum()


class TwoLayer(nn.Module):
    def __init__(self, d=6, h=10):
        super().__init__()
        self.fc = CastedLinear(d, h, bias=False)
        self.proj = BareLinear(h, d)
        self.gate = Gate()

    def forward(self, x):
        a = torch.relu(self.fc(x))
        return self.gate(self.proj(a))


class TiedLM(nn.Module):
    def __init__(self, vocab=17, d=8):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.mlp = nn.Linear(d, d)
        self.final_norm = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.tok_emb(idx)
        x = x + self.mlp(x)
        return F.linear(self.final_norm(x), self.tok_emb.weight)


def xtx(x):
    x = x.detach().reshape(-1, x.shape[-1]).double()
    return (x.T @ x).numpy()


def assert_h_close(got, want, rel=1e-5):
    """float32 per-batch products: compare to a float64 reference relative to the matrix scale."""
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


def test_two_linear_layers_match_direct_xtx():
    torch.manual_seed(0)
    m = TwoLayer()
    batches = [torch.randn(3, 4, 6) for _ in range(3)]
    with HessianCollector(m) as hc:
        for b in batches:
            m(b)
    assert sorted(hc.names()) == ["fc.weight", "proj.weight"]  # the gate was dropped
    hs, counts = hc.hessians(), hc.counts()
    h_fc = sum(xtx(b) for b in batches)
    h_proj = sum(xtx(torch.relu(m.fc(b))) for b in batches)
    assert_h_close(hs["fc.weight"], h_fc)
    assert_h_close(hs["proj.weight"], h_proj)
    assert hs["fc.weight"].dtype == np.float64
    assert counts == {"fc.weight": 36, "proj.weight": 36}
    # The hooks are gone after the with-block.
    m(batches[0])
    assert hc.counts()["fc.weight"] == 36


def test_float32_accumulation():
    m = TwoLayer()
    x = torch.randn(5, 6)
    hc = HessianCollector(m, dtype=torch.float32)
    m(x)
    hc.remove()
    h = hc.hessians()["fc.weight"]
    assert h.dtype == np.float32
    assert_h_close(h, xtx(x))


def test_tied_embedding_head_uses_final_norm_output():
    torch.manual_seed(1)
    m = TiedLM()
    idx = [torch.randint(0, 17, (2, 5)) for _ in range(2)]
    with HessianCollector(m, tied_lm_head={"final_norm": "tok_emb.weight"}) as hc:
        for i in idx:
            m(i)
    hs, counts = hc.hessians(), hc.counts()
    assert sorted(hs) == ["mlp.weight", "tok_emb.weight"]

    def normed(i):
        x = m.tok_emb(i)
        return m.final_norm(x + m.mlp(x))

    assert_h_close(hs["tok_emb.weight"], sum(xtx(normed(i)) for i in idx))
    assert_h_close(hs["mlp.weight"], sum(xtx(m.tok_emb(i)) for i in idx))
    assert counts == {"mlp.weight": 20, "tok_emb.weight": 20}


def test_include_list_and_callable():
    m = TwoLayer()
    x = torch.randn(4, 6)
    with HessianCollector(m, include=["proj"]) as hc:
        m(x)
    assert list(hc.hessians()) == ["proj.weight"]
    with HessianCollector(m, include=lambda name, mod: isinstance(mod, nn.Linear)) as hc:
        m(x)
    assert list(hc.hessians()) == ["fc.weight"]


def test_explicit_name_that_is_not_linear_raises_on_forward():
    m = TwoLayer()
    with HessianCollector(m, include=["gate.weight"]):
        with pytest.raises(PgolfError, match=r"Hessian hook for gate.weight: its input is shape \(4, 6\)"):
            m(torch.randn(4, 6))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"include": ["nope"]}, r"cannot collect a Hessian for 'nope': no such module"),
        ({"tied_lm_head": {"norm": "tok_emb.weight"}}, r"no module named 'norm'"),
        ({"tied_lm_head": {"final_norm": "emb.weight"}}, r"no 2-D parameter named 'emb.weight'"),
        ({"tied_lm_head": {"final_norm": "mlp.weight"}}, r"mlp.weight is already collected"),
        ({"dtype": torch.float16}, r"float32 or float64"),
    ],
)
def test_collector_argument_errors(kwargs, msg):
    with pytest.raises(PgolfError, match=msg):
        HessianCollector(TiedLM(), **kwargs)


def test_reset_and_unseen_layers():
    m = TwoLayer()
    hc = HessianCollector(m)
    assert hc.hessians() == {}  # nothing ran yet
    m(torch.randn(2, 6))
    hc.reset()
    x = torch.randn(3, 6)
    m(x)
    assert_h_close(hc.hessians()["fc.weight"], xtx(x))
    hc.remove()


def test_keyword_input_is_seen():
    lin = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with HessianCollector(lin) as hc:
        lin(input=x)
    assert_h_close(hc.hessians()["weight"], xtx(x))


@settings(max_examples=15, deadline=None)
@given(
    dims=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    store64=st.booleans(),
)
def test_save_load_roundtrip(tmp_path_factory, dims, seed, store64):
    rng = np.random.default_rng(seed)
    hs, counts = {}, {}
    for i, d in enumerate(dims):
        x = rng.standard_normal((d + 3, d))
        hs[f"blocks.{i}.mlp.fc.weight"] = x.T @ x
        counts[f"blocks.{i}.mlp.fc.weight"] = d + 3
    path = tmp_path_factory.mktemp("h") / "hessians.safetensors"
    save_hessians(path, hs, counts, {"tokens": 123, "source": "test"}, dtype=np.float64 if store64 else np.float32)
    got, got_counts, meta = load_hessians_with_meta(path)
    assert got_counts == counts and meta == {"tokens": 123, "source": "test"}
    assert sorted(got) == sorted(hs)
    for k in hs:
        assert got[k].dtype == (np.float64 if store64 else np.float32)
        np.testing.assert_allclose(got[k], hs[k], rtol=1e-6 if not store64 else 0)
    assert [p.name for p in path.parent.iterdir()] == ["hessians.safetensors"]  # no temp files left


def test_collector_to_file_to_gptq(tmp_path):
    from pgolf_pack.quant.gptq import gptq_quantize

    m = TwoLayer(d=16, h=24)
    with HessianCollector(m) as hc:
        m(torch.randn(64, 16))
    path = tmp_path / "h.safetensors"
    save_hessians(path, hc.hessians(), hc.counts())
    hs, counts = load_hessians(path)
    assert counts == {"fc.weight": 64, "proj.weight": 64}
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    check_hessians_match(hs, {k: v.shape for k, v in sd.items()})
    qt = gptq_quantize("fc.weight", sd["fc.weight"], "float32", hs["fc.weight"], 4, sigmas=3.0)
    assert qt.params["method"] == "gptq"


def test_plain_safetensors_without_metadata_loads(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a.weight": np.eye(3, dtype=np.float32)}, str(path))
    hs, counts = load_hessians(path)
    assert counts == {} and list(hs) == ["a.weight"]


def test_load_errors(tmp_path):
    with pytest.raises(PgolfError, match="Hessian file not found"):
        load_hessians(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(PgolfError, match="cannot read Hessian file"):
        load_hessians(bad)
    good = tmp_path / "good.safetensors"
    save_hessians(good, {"a.weight": np.eye(4)}, {"a.weight": 4})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(PgolfError, match="cannot read Hessian file"):
        load_hessians(cut)
    rect = tmp_path / "rect.safetensors"
    save_file({"a.weight": np.ones((3, 4), np.float32)}, str(rect))
    with pytest.raises(PgolfError, match=r"Hessian a.weight has shape \(3, 4\)"):
        load_hessians(rect)
    nan = tmp_path / "nan.safetensors"
    save_file({"a.weight": np.full((2, 2), np.nan, np.float32)}, str(nan))
    with pytest.raises(PgolfError, match="contains NaN or Inf"):
        load_hessians(nan)
    other = tmp_path / "other.safetensors"
    save_file({"a.weight": np.eye(2, dtype=np.float32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(PgolfError, match="not a pgolf-pack Hessian file"):
        load_hessians(other)
    badcount = tmp_path / "badcount.safetensors"
    save_file({"a.weight": np.eye(2, dtype=np.float32)}, str(badcount),
              metadata={"format": "pgolf-hessians", "counts": json.dumps({"b.weight": 3})})
    with pytest.raises(PgolfError, match="bad sample count 3 for 'b.weight'"):
        load_hessians(badcount)


def test_save_errors(tmp_path):
    with pytest.raises(PgolfError, match=r"negative diagonal"):
        save_hessians(tmp_path / "h.safetensors", {"a.weight": -np.eye(2)})
    with pytest.raises(PgolfError, match=r"counts given for names without a Hessian: b.weight"):
        save_hessians(tmp_path / "h.safetensors", {"a.weight": np.eye(2)}, {"b.weight": 1})
    with pytest.raises(PgolfError, match="output directory does not exist"):
        save_hessians(tmp_path / "no" / "h.safetensors", {"a.weight": np.eye(2)})
    assert list(tmp_path.iterdir()) == []


def test_check_hessians_match():
    weights = {"a.weight": (5, 3), "b": (4,)}
    check_hessians_match({"a.weight": np.eye(3)}, weights)
    with pytest.raises(PgolfError, match=r"Hessian a.weight is 4×4, but a.weight \(5, 3\) needs 3×3"):
        check_hessians_match({"a.weight": np.eye(4)}, weights)
    with pytest.raises(PgolfError, match="names no tensor of the checkpoint"):
        check_hessians_match({"c.weight": np.eye(3)}, weights)
    with pytest.raises(PgolfError, match="not a 2-D matrix"):
        check_hessians_match({"b": np.eye(4)}, weights)


class SharedInput(nn.Module):
    """q, k, v read the same tensor; an in-place edit between two of the calls must be seen."""

    def __init__(self, d=5):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, 3, bias=False)
        self.v = nn.Linear(d, 3, bias=False)

    def forward(self, x):
        x = x * 1.0
        a = self.q(x) + self.k(x).sum()
        x.mul_(2.0)
        return a.sum() + self.v(x).sum()


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_shared_inputs_reuse_but_stay_exact(mode):
    m = SharedInput()
    x = torch.randn(7, 5)
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with ctx(), HessianCollector(m) as hc:
        m(x)
        m(x)
    hs = hc.hessians()
    assert_h_close(hs["q.weight"], 2 * xtx(x))
    assert_h_close(hs["k.weight"], 2 * xtx(x))
    assert_h_close(hs["v.weight"], 2 * xtx(2 * x))


def test_float64_model_is_accumulated_exactly():
    m = TwoLayer().double()
    xs = [torch.randn(3, 6, dtype=torch.float64) for _ in range(2)]
    with HessianCollector(m) as hc:
        for x in xs:
            m(x)
    np.testing.assert_allclose(hc.hessians()["fc.weight"], sum(xtx(x) for x in xs), rtol=1e-13)


def test_bfloat16_inputs_use_a_float32_product():
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(16, 8).to(torch.bfloat16)
    with HessianCollector(lin) as hc:
        lin(x)
    assert_h_close(hc.hessians()["weight"], xtx(x.float()), rel=1e-6)


def test_hessian_file_bytes_are_deterministic_and_standard(tmp_path):
    """Same Hessians, same bytes (the safetensors library writes its metadata in hash order); the
    file is plain safetensors that the library itself reads."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    script = (
        "import sys, numpy as np\n"
        "from pgolf_pack.calib.hessian import save_hessians\n"
        "x = np.arange(12.0).reshape(4, 3)\n"
        "save_hessians(sys.argv[1], {'b.weight': x.T @ x, 'a.weight': np.eye(2)}, {'a.weight': 5, 'b.weight': 4},\n"
        "              {'seqs': 2, 'tokens': 'train_*.bin'})\n")
    import os
    from pathlib import Path

    import pgolf_pack

    root = str(Path(pgolf_pack.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    paths = [tmp_path / f"H{i}.safetensors" for i in range(3)]
    for p in paths:  # separate processes: each gets its own hash seed
        subprocess.run([sys.executable, "-c", script, str(p)], check=True, env=env)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    hs, counts, meta = load_hessians_with_meta(paths[0])
    assert counts == {"a.weight": 5, "b.weight": 4} and meta == {"seqs": 2, "tokens": "train_*.bin"}
    lib = load_file(str(paths[0]))
    x = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(lib["b.weight"], (x.T @ x).astype(np.float32))
    np.testing.assert_array_equal(hs["a.weight"], np.eye(2, dtype=np.float32))
