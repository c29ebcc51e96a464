"""Validation loss and bits-per-byte, computed the way the Parameter Golf baseline scores a model.

The validation stream is cut into consecutive, non-overlapping windows of ``seq_len`` inputs;
the targets are the next tokens, so a stream of N tokens scores ``(N - 1) // seq_len`` windows
and every target in them. Bytes come from the sentencepiece pieces: control/unknown/unused ids
are 0 bytes and count as boundaries, byte-fallback ids are 1 byte, other pieces their UTF-8
length without a leading '▁', plus one space byte for that '▁' unless the previous token is a
boundary. BPB = total nats / ln 2 / total bytes.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..errors import PgolfError

SPACE_MARK = "\u2581"  # sentencepiece's '▁'


class ByteLuts(NamedTuple):
    base_bytes: np.ndarray  # int16, UTF-8 bytes of the piece without its leading '▁'
    has_leading_space: np.ndarray  # bool, the piece starts with '▁'
    is_boundary: np.ndarray  # bool, control / unknown / unused (and ids past the tokenizer's vocab)


def load_sentencepiece(sp_model_path: str | os.PathLike):
    import sentencepiece as spm

    path = Path(sp_model_path)
    if not path.is_file():
        raise PgolfError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise PgolfError(f"{path} is not a sentencepiece model ({str(e).strip().splitlines()[0] if str(e).strip() else 'load failed'})") from None
    if not ok:
        raise PgolfError(f"{path} is not a sentencepiece model")
    return sp


def byte_luts_from_processor(sp, vocab_size: int) -> ByteLuts:
    n_sp = int(sp.vocab_size())
    size = max(n_sp, int(vocab_size))
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLuts(base, space, boundary)


def token_byte_luts(sp_model_path: str | os.PathLike, vocab_size: int) -> ByteLuts:
    """Per-token byte tables of a sentencepiece model, padded to ``vocab_size`` entries."""
    return byte_luts_from_processor(load_sentencepiece(sp_model_path), vocab_size)


def target_bytes(luts: ByteLuts, prev: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """UTF-8 bytes each target token stands for, given the token before it."""
    prev = np.asarray(prev, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    extra = luts.has_leading_space[targets] & ~luts.is_boundary[prev]
    return luts.base_bytes[targets].astype(np.int64) + extra.astype(np.int64)


def evaluate_bpb(
    model,
    tokens,
    sp_model_path: str | os.PathLike,
    seq_len: int = 1024,
    batch_seqs: int = 8,
    max_seqs: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    autocast_bf16: bool = False,
) -> dict:
    """Mean next-token loss (nats) and BPB of ``model`` on ``tokens``.

    ``model`` is any ``nn.Module`` (or the adapter's ``LoadedModel``) called as
    ``model(input_ids, target_ids)`` (or ``model(input_ids)``) that returns the mean loss or
    logits (see :mod:`.adapter`). ``progress(done_seqs, total_seqs)`` is called after every batch.
    With ``autocast_bf16`` the forward runs under bf16 autocast (matmuls in bf16); the default is
    float32. To reproduce the challenge's own logged figure for the reference GPT, load it with
    ``baseline_bf16=True`` instead. Returns ``loss``, ``bpb``, ``tokens`` (scored targets),
    ``bytes``, ``seqs`` and ``seconds``.
    """
    from .adapter import LoadedModel, module_device, nll_sum

    t0 = time.perf_counter()
    if isinstance(model, LoadedModel):
        model = model.module
    if seq_len <= 0 or batch_seqs <= 0:
        raise PgolfError(f"seq_len and batch_seqs must be positive, got {seq_len} and {batch_seqs}")
    toks = torch.as_tensor(np.asarray(tokens).astype(np.int64, copy=False)).reshape(-1)
    total_seqs = (toks.numel() - 1) // seq_len
    if max_seqs is not None:
        total_seqs = min(total_seqs, int(max_seqs))
    if total_seqs <= 0:
        raise PgolfError(f"need more than {seq_len} tokens to score one sequence of seq_len {seq_len}, got {toks.numel()}")
    sp = load_sentencepiece(sp_model_path)
    sp_vocab = int(sp.vocab_size())
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if model_vocab is not None and int(model_vocab) != sp_vocab:
        raise PgolfError(f"model vocab {model_vocab} does not match the tokenizer's vocab {sp_vocab}")
    luts = byte_luts_from_processor(sp, int(model_vocab or sp_vocab))
    used = toks[: total_seqs * seq_len + 1]
    if int(used.min()) < 0 or int(used.max()) >= luts.base_bytes.size:
        raise PgolfError(f"token ids range {int(used.min())}..{int(used.max())} outside the vocab of {luts.base_bytes.size}")

    device = module_device(model)
    was_training = model.training
    model.eval()
    nll_total = 0.0
    byte_sum = 0
    try:
        # no_grad, not inference_mode: a table the model caches during the pass (rotary) must stay
        # usable by a later backward pass on the same module (the sensitivity guide).
        with torch.no_grad():
            for start in range(0, total_seqs, batch_seqs):
                stop = min(start + batch_seqs, total_seqs)
                chunk = used[start * seq_len : stop * seq_len + 1]
                x = chunk[:-1].view(-1, seq_len)
                y = chunk[1:].view(-1, seq_len)
                nll, vocab = nll_sum(model, x.to(device), y.to(device), autocast_bf16=autocast_bf16)
                if vocab is not None and vocab != sp_vocab:
                    raise PgolfError(f"the model's logits have {vocab} entries per token, the tokenizer's vocab is {sp_vocab}")
                nll_total += nll
                byte_sum += int(target_bytes(luts, x.numpy().ravel(), y.numpy().ravel()).sum())
                if progress is not None:
                    progress(stop, total_seqs)
    finally:
        model.train(was_training)
    n_targets = total_seqs * seq_len
    if byte_sum <= 0:
        raise PgolfError("the scored tokens decode to 0 bytes; cannot compute BPB")
    return {
        "loss": nll_total / n_targets,
        "bpb": nll_total / math.log(2.0) / byte_sum,
        "tokens": n_targets,
        "bytes": byte_sum,
        "seqs": total_seqs,
        "seconds": time.perf_counter() - t0,
    }
