"""A small architecture of its own, as a user would write it (the adapter tests load it through
the factory ``make_model``): other parameter names than the baseline's, SwiGLU MLPs, an untied
output head, biases on some Linears, one matrix applied through ``F.linear`` outside any Linear
module; the forward returns logits."""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=True)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.out = nn.Linear(dim, dim, bias=False)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, dim=64, hidden=128, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, hidden) for _ in range(layers))
        self.mix = nn.Parameter(torch.zeros(dim, dim))  # applied through F.linear, not a module
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=True)

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        x = x + F.linear(x, self.mix)
        return self.head(self.norm(x))


def make_model(state_dict, device):
    vocab, dim = state_dict["embed.weight"].shape
    hidden = state_dict["layers.0.ffn.gate.weight"].shape[0]
    layers = len({k.split(".")[1] for k in state_dict if k.startswith("layers.")})
    model = TinyLM(vocab, dim, hidden, layers)
    model.load_state_dict(state_dict)
    return model.to(device)
