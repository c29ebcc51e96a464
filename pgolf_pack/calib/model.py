"""Reference GPT: the Parameter Golf NaiveBaseline architecture, for evaluation and calibration.

Re-implemented from the challenge's baseline ``train_gpt.py`` so that a checkpoint trained there
loads here with the same parameter names and gives the same logits: RMSNorm without weights,
rotary attention with RMS-normed q/k and a per-head ``q_gain``, grouped-query heads, a relu²
MLP, per-channel ``attn_scale`` / ``mlp_scale`` and a ``resid_mix`` blend with the embedding
stream, U-Net style skips between the first and second half of the blocks, tied embeddings and
a tanh logit soft-cap.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PgolfError

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class GPTConfig:
    """Shape and fixed hyperparameters of the baseline GPT (defaults: the 9x512 sp1024 baseline)."""

    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    # The baseline runs its module after .bfloat16(): the embedding (so the whole residual stream
    # and every matmul) and the rotary buffer are bf16, positions above 256 rounded. True
    # reproduces that computation, and so the challenge's logged val_bpb, exactly.
    baseline_bf16: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                raise PgolfError(f"GPT config: {name} must be positive, got {getattr(self, name)}")
        if self.model_dim % self.num_heads:
            raise PgolfError(f"GPT config: model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise PgolfError(f"GPT config: num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise PgolfError(f"GPT config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.logit_softcap <= 0:
            raise PgolfError(f"GPT config: logit_softcap must be positive, got {self.logit_softcap}")
        if self.mlp_hidden <= 0 or abs(self.mlp_hidden - self.mlp_mult * self.model_dim) > 1e-6:
            raise PgolfError(f"GPT config: mlp_mult {self.mlp_mult} x model_dim {self.model_dim} is not a whole number")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_mult * self.model_dim))

    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers // 2

    @property
    def num_skip_weights(self) -> int:
        return min(self.num_encoder_layers, self.num_layers - self.num_encoder_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], **overrides) -> "GPTConfig":
        """Infer the shape from tensor shapes; ``overrides`` win over anything inferred.

        ``q_gain`` has one entry per query head, which pins the head count; without it the
        head count falls back to head_dim 64 where that divides the width.
        """
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PgolfError(f"unknown GPT config option(s): {', '.join(sorted(unknown))}")
        if "tok_emb.weight" not in sd:
            raise PgolfError("not a baseline GPT state dict: no tok_emb.weight")
        emb = sd["tok_emb.weight"]
        if emb.dim() != 2:
            raise PgolfError(f"tok_emb.weight must be 2-D, got shape {tuple(emb.shape)}")
        vocab, dim = (int(s) for s in emb.shape)
        layers = sorted({int(m.group(1)) for k in sd for m in [_BLOCK_KEY.match(k)] if m})
        if not layers:
            raise PgolfError("not a baseline GPT state dict: no blocks.{i}.* tensors")
        if layers != list(range(len(layers))):
            raise PgolfError(f"block indices are not contiguous from 0: {layers}")
        inferred: dict = dict(vocab_size=vocab, model_dim=dim, num_layers=len(layers),
                              tie_embeddings="lm_head.weight" not in sd)
        q_gain = sd.get("blocks.0.attn.q_gain")
        heads = overrides.get("num_heads")
        if heads is None:
            if q_gain is not None:
                heads = int(q_gain.numel())
            else:
                heads = dim // 64 if dim % 64 == 0 else cls.num_heads
        inferred["num_heads"] = heads
        c_k = sd.get("blocks.0.attn.c_k.weight")
        if c_k is not None and heads > 0 and dim % heads == 0:
            head_dim = dim // heads
            if int(c_k.shape[0]) % head_dim:
                raise PgolfError(f"c_k has {c_k.shape[0]} rows, not a multiple of head_dim {head_dim}")
            inferred["num_kv_heads"] = int(c_k.shape[0]) // head_dim
        fc = sd.get("blocks.0.mlp.fc.weight")
        if fc is not None:
            hidden = int(fc.shape[0])
            inferred["mlp_mult"] = hidden // dim if hidden % dim == 0 else hidden / dim
        inferred.update(overrides)
        return cls(**inferred)


class RMSNorm(nn.Module):
    """Weightless RMS norm; eps follows the input dtype, as in the baseline (F.rms_norm default)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear that runs in the input's dtype whatever dtype its weight is stored in."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float, table_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.table_dtype = table_dtype
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            pos = torch.arange(seq_len, device=device, dtype=self.table_dtype)
            angles = torch.outer(pos, self.inv_freq.to(device=device, dtype=self.table_dtype))
            self._cache = (seq_len, device, angles.cos()[None, None], angles.sin()[None, None])
        return self._cache[2].to(dtype), self._cache[3].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the (first half, second half) pairs of the head dimension; the baseline's sign convention."""
    half = x.size(-1) // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, cfg.kv_dim)
        self.c_v = CastedLinear(cfg.model_dim, cfg.kv_dim)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, torch.bfloat16 if cfg.baseline_bf16 else torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.c_q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (self.head_dim,))
        k = F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(t, x.device, q.dtype)
        q = apply_rotary(q, cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.model_dim
        self.attn_scale = nn.Parameter(torch.ones(d, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(d, dtype=torch.float32))
        # Row 0 weighs the running stream, row 1 the normalized embedding x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))).float())
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.attn_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """The baseline GPT. ``forward(idx)`` gives soft-capped logits of shape (batch, seq, vocab)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.skip_weights = nn.Parameter(torch.ones(cfg.num_skip_weights, cfg.model_dim, dtype=torch.float32))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm()
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The baseline's initialization: small tied embedding, zero output projections."""
        with torch.no_grad():
            self.tok_emb.weight.normal_(0.0, self.config.tied_embed_init_std if self.config.tie_embeddings else 1.0,
                                        generator=generator)
            for name, mod in self.named_modules():
                if not isinstance(mod, CastedLinear):
                    continue
                if name.endswith(".proj") or name == "lm_head":
                    mod.weight.zero_()
                else:
                    bound = 1.0 / mod.in_features ** 0.5  # nn.Linear's default kaiming-uniform bound
                    mod.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        if self.config.baseline_bf16:
            x = x.to(torch.bfloat16)
        x = F.rms_norm(x, (x.size(-1),))
        x0 = x
        skips: list[Tensor] = []
        n_enc = self.config.num_encoder_layers
        for block in self.blocks[:n_enc]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[n_enc:]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = F.linear(x, self.tok_emb.weight.to(x.dtype))
        else:
            logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

    def loss(self, idx: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token cross entropy in nats, computed in float32 as the baseline does."""
        logits = self(idx)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
