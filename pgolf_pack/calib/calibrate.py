"""Hessians for GPTQ from any model the adapter builds, and the state dict of a checkpoint or an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..checkpoint import DEFAULT_MIN_NUMEL, is_quantizable, load_checkpoint
from ..errors import PgolfError
from .adapter import LoadedModel, call_model, module_device
from .hessian import HessianCollector


def pick_sequences(tokens: np.ndarray, n_seqs: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``n_seqs`` windows of ``seq_len + 1`` tokens (inputs and their next-token targets) at seeded
    random offsets, non-overlapping in their inputs when possible."""
    n_avail = (tokens.size - 1) // seq_len
    if n_avail <= 0:
        raise PgolfError(f"need more than {seq_len} calibration tokens, got {tokens.size}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n_avail, size=min(n_seqs, n_avail), replace=False))
    return np.stack([tokens[i * seq_len : (i + 1) * seq_len + 1] for i in idx]).astype(np.int64)


def calibration_batches(tokens: np.ndarray, n_seqs: int = 64, seq_len: int = 1024, batch_seqs: int = 4,
                        seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, target_ids) batches of ``batch_seqs`` windows picked by :func:`pick_sequences`."""
    if batch_seqs <= 0:
        raise PgolfError(f"batch must be positive, got {batch_seqs}")
    seqs = torch.from_numpy(pick_sequences(tokens, n_seqs, seq_len, seed))
    return [(seqs[i : i + batch_seqs, :-1], seqs[i : i + batch_seqs, 1:]) for i in range(0, len(seqs), batch_seqs)]


def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
    t = torch.as_tensor(batch)
    if t.dim() != 2 or t.size(1) < 2:
        raise PgolfError(f"a calibration batch is (input_ids, target_ids) or one (batch, seq + 1) tensor of token ids; "
                         f"got shape {tuple(t.shape)}")
    return t[:, :-1], t[:, 1:]


def collect_hessians(
    model: nn.Module | LoadedModel,
    batches: Iterable,
    tied_head: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    uses: dict[str, list[str]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Run ``model`` over calibration batches and collect H = Σ xᵀx per weight, for any model.

    Each batch is ``(input_ids, target_ids)`` or one (batch, seq + 1) tensor of token ids; the
    forward is called as the adapter calls it. Weights come from every Linear-like module, from
    ``F.linear`` calls on a parameter itself (a tied head ``F.linear(x, tok_emb.weight)``), from a
    ``tied_head`` ``{module: weight}`` fed by that module's output, and lookup-only embeddings get
    the identity Hessian (see :class:`HessianCollector`). ``progress(done, total)`` after each batch;
    ``uses``, when given, is filled with the torch functions each other matrix was passed to (what
    a warning about a matrix without a Hessian can name).
    """
    if isinstance(model, LoadedModel):
        tied_head = tied_head if tied_head is not None else model.tied_head
        model = model.module
    batches = list(batches)
    device = module_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), HessianCollector(model, tied_lm_head=tied_head, functional=True,
                                               lookup_embeddings=True) as hc:
            for i, batch in enumerate(batches):
                x, y = _split(batch)
                call_model(model, x.to(device), y.to(device))
                if progress:
                    progress(i + 1, len(batches))
            H, counts = hc.hessians(), hc.counts()
            if uses is not None:
                uses.update(hc.uses())
            return H, counts
    finally:
        model.train(was_training)


def weights_without_hessian(model: nn.Module, hessians: Mapping[str, np.ndarray],
                            min_numel: int = DEFAULT_MIN_NUMEL) -> list[str]:
    """Quantizable matrices of ``model`` that got no Hessian: applied some way the hooks cannot
    see (``x @ W.T``, a cast or slice passed to ``F.linear``, a head fed by a known module)."""
    return [n for n, p in model.named_parameters() if n not in hessians and is_quantizable(p.detach(), min_numel)]


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
