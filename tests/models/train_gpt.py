"""A Parameter-Golf-style single-file training script, as the adapter tests run it: Hyperparameters
read from the environment in the class body, ``GPT(...)`` built from them in ``main()``, training
under a ``__main__`` guard, a tied head applied as ``F.linear(x, tok_emb.weight)``, and a forward
that returns the mean loss, as the challenge's scripts do."""

import glob
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Hyperparameters:
    data_path = os.environ.get("DATA_PATH", "./data")
    train_files = os.path.join(data_path, "*train_*.bin")
    seed = int(os.environ.get("SEED", 1337))
    iterations = int(os.environ.get("ITERATIONS", 30))
    train_seq_len = int(os.environ.get("TRAIN_SEQ_LEN", 64))
    vocab_size = int(os.environ.get("VOCAB_SIZE", 512))
    num_layers = int(os.environ.get("NUM_LAYERS", 3))
    model_dim = int(os.environ.get("MODEL_DIM", 64))
    mlp_mult = int(os.environ.get("MLP_MULT", 2))
    logit_softcap = float(os.environ.get("LOGIT_SOFTCAP", 30.0))
    lr = float(os.environ.get("LR", 0.01))


class RMSNorm(nn.Module):
    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Block(nn.Module):
    def __init__(self, dim, mlp_mult):
        super().__init__()
        self.norm = RMSNorm()
        self.c_attn = CastedLinear(dim, 3 * dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.fc = CastedLinear(dim, mlp_mult * dim, bias=False)
        self.out = CastedLinear(mlp_mult * dim, dim, bias=False)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.norm(x)).view(b, t, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.scale * self.out(torch.relu(self.fc(self.norm(x))).square())


class GPT(nn.Module):
    def __init__(self, vocab_size, num_layers, model_dim, mlp_mult, logit_softcap, tied_embed_init_std=0.02):
        super().__init__()
        self.logit_softcap = logit_softcap
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        self.blocks = nn.ModuleList(Block(model_dim, mlp_mult) for _ in range(num_layers))
        self.final_norm = RMSNorm()

    def forward(self, input_ids, target_ids):
        x = self.tok_emb(input_ids)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x).reshape(-1, x.size(-1))
        logits = F.linear(x, self.tok_emb.weight)
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return F.cross_entropy(logits.float(), target_ids.reshape(-1), reduction="mean")


def load_tokens(pattern):
    parts = [np.fromfile(f, dtype="<u2", offset=1024) for f in sorted(glob.glob(pattern))]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def main():
    args = Hyperparameters()
    torch.manual_seed(args.seed)
    model = GPT(vocab_size=args.vocab_size, num_layers=args.num_layers, model_dim=args.model_dim,
                mlp_mult=args.mlp_mult, logit_softcap=args.logit_softcap)
    tokens = load_tokens(args.train_files)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = args.train_seq_len
    for step in range(args.iterations):
        starts = torch.randint(0, tokens.numel() - n - 1, (8,))
        x = torch.stack([tokens[s:s + n] for s in starts])
        y = torch.stack([tokens[s + 1:s + n + 1] for s in starts])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), "final_model.pt")
    print(f"final train loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
