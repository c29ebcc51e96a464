"""Hessians for GPTQ from the reference architecture, and BPB of a checkpoint or an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import PgolfError
from .hessian import HessianCollector
from .model import load_model


def pick_sequences(tokens: np.ndarray, n_seqs: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``n_seqs`` windows of ``seq_len`` tokens at seeded random offsets (non-overlapping when possible)."""
    n_avail = tokens.size // seq_len
    if n_avail == 0:
        raise PgolfError(f"need at least {seq_len} calibration tokens, got {tokens.size}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n_avail, size=min(n_seqs, n_avail), replace=False))
    return np.stack([tokens[i * seq_len : (i + 1) * seq_len] for i in idx]).astype(np.int64)


def collect_hessians(
    state_dict: Mapping[str, torch.Tensor],
    tokens: np.ndarray,
    n_seqs: int = 64,
    seq_len: int = 1024,
    batch_seqs: int = 4,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **model_overrides,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Run the reference GPT over calibration sequences and collect H = Σ xᵀx per weight.

    The tied embedding's Hessian comes from the final norm's output: that is the LM head's input,
    which is where the embedding matrix's rounding error reaches the logits.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PgolfError("--device cuda requested but no CUDA device is available")
    model = load_model(state_dict, **model_overrides).to(device).eval()
    seqs = torch.from_numpy(pick_sequences(tokens, n_seqs, seq_len, seed))
    tied = {"final_norm": "tok_emb.weight"} if model.lm_head is None else None
    with torch.no_grad(), HessianCollector(model, tied_lm_head=tied) as hc:
        for i in range(0, len(seqs), batch_seqs):
            model(seqs[i : i + batch_seqs].to(device))
            if progress:
                progress(min(i + batch_seqs, len(seqs)), len(seqs))
        return hc.hessians(), hc.counts()


def state_dict_of(path: str | Path) -> dict[str, torch.Tensor]:
    """A float state dict from a checkpoint, or from an artifact after a full decode + dequantize."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    from ..pack.container import MAGIC

    if magic == MAGIC:
        from ..pack.packer import unpack_model
        from ..verify import dequantize_model, read_artifact

        qm, _ = unpack_model(read_artifact(path))
        return dequantize_model(qm)
    return load_checkpoint(path)
