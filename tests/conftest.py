import numpy as np
import pytest
import torch
from safetensors.torch import save_file


def make_state_dict(seed: int = 0, layers: int = 2, dim: int = 64, vocab: int = 256) -> dict[str, torch.Tensor]:
    """A small state dict with Parameter Golf baseline names and heavy-ish tailed weights."""
    g = torch.Generator().manual_seed(seed)

    def mat(r, c, scale=0.05):
        # Student-t-like tails so clip choices matter.
        x = torch.randn(r, c, generator=g) * scale
        x[torch.rand(r, c, generator=g) < 0.01] *= 6
        return x

    sd = {"tok_emb.weight": mat(vocab, dim, 0.8).to(torch.bfloat16)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = mat(dim, dim)
        sd[p + "attn.c_k.weight"] = mat(dim // 2, dim)
        sd[p + "attn.c_v.weight"] = mat(dim // 2, dim)
        sd[p + "attn.proj.weight"] = mat(dim, dim)
        sd[p + "mlp.fc.weight"] = mat(2 * dim, dim)
        sd[p + "mlp.proj.weight"] = mat(dim, 2 * dim)
        sd[p + "attn_scale"] = torch.ones(dim)
        sd[p + "mlp_scale"] = torch.ones(dim)
        sd[p + "resid_mix"] = torch.stack([torch.ones(dim), torch.zeros(dim)])
        sd[p + "attn.q_gain"] = torch.full((4,), 1.5)
    sd["skip_weights"] = torch.ones(layers // 2 or 1, dim)
    return sd


@pytest.fixture
def state_dict():
    return make_state_dict()


@pytest.fixture
def ckpt_path(tmp_path, state_dict):
    p = tmp_path / "model.safetensors"
    save_file(state_dict, str(p))
    return p


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
