"""A Parameter Golf submission in miniature: load the model through the exported decoder, score it.

What ships is this file, ``pgp_decode.py`` (written by ``pgolf-pack export-decoder``) and the
artifact; nothing here imports pgolf_pack. The model is the challenge's baseline GPT, written
out again below: weightless RMSNorm, rotary attention with RMS-normed q/k and a per-head gain,
grouped-query heads, relu² MLP, per-channel residual scales and an embedding blend, U-Net skips,
tied embeddings and a tanh logit cap. Validation BPB is scored as the challenge does: windows of
``--seq-len`` tokens, nats over the UTF-8 bytes the target pieces stand for.

    python train_gpt.py --artifact model.pgp --val tiny_val_000000.bin --tokenizer tiny_sp512.model
"""

import argparse
import math
import time

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

import pgp_decode


def rotate(x, cos, sin):
    h = x.size(-1) // 2
    return torch.cat((x[..., :h] * cos + x[..., h:] * sin, x[..., h:] * cos - x[..., :h] * sin), -1)


def attention(w, p, x, heads):
    b, t, d = x.shape
    hd = d // heads
    kv = w[p + "c_k.weight"].shape[0] // hd
    q = F.linear(x, w[p + "c_q.weight"]).view(b, t, heads, hd).transpose(1, 2)
    k = F.linear(x, w[p + "c_k.weight"]).view(b, t, kv, hd).transpose(1, 2)
    v = F.linear(x, w[p + "c_v.weight"]).view(b, t, kv, hd).transpose(1, 2)
    q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
    freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), freq)
    cos, sin = ang.cos()[None, None], ang.sin()[None, None]
    q = rotate(q, cos, sin) * w[p + "q_gain"][None, :, None, None]
    y = F.scaled_dot_product_attention(q, rotate(k, cos, sin), v, is_causal=True, enable_gqa=kv != heads)
    return F.linear(y.transpose(1, 2).reshape(b, t, d), w[p + "proj.weight"])


def forward(w, idx, layers):
    heads = w["blocks.0.attn.q_gain"].numel()
    x = x0 = F.rms_norm(F.embedding(idx, w["tok_emb.weight"]), (w["tok_emb.weight"].shape[1],))
    skips = []
    for i in range(layers):
        p = f"blocks.{i}."
        if i >= layers // 2 and skips:
            x = x + w["skip_weights"][i - layers // 2] * skips.pop()
        mix = w[p + "resid_mix"]
        x = mix[0] * x + mix[1] * x0
        x = x + w[p + "attn_scale"] * attention(w, p + "attn.", F.rms_norm(x, (x.size(-1),)), heads)
        h = F.relu(F.linear(F.rms_norm(x, (x.size(-1),)), w[p + "mlp.fc.weight"])).square()
        x = x + w[p + "mlp_scale"] * F.linear(h, w[p + "mlp.proj.weight"])
        if i < layers // 2:
            skips.append(x)
    logits = F.linear(F.rms_norm(x, (x.size(-1),)), w.get("lm_head.weight", w["tok_emb.weight"]))
    return 30.0 * torch.tanh(logits / 30.0)


def piece_bytes(sp, vocab):
    base, space, boundary = np.zeros(vocab, np.int64), np.zeros(vocab, bool), np.ones(vocab, bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        piece = sp.id_to_piece(i)
        space[i] = not sp.is_byte(i) and piece.startswith("\u2581")
        base[i] = 1 if sp.is_byte(i) else len(piece[int(space[i]):].encode())
    return base, space, boundary


def val_bpb(w, tokens, sp, seq_len, max_seqs):
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    base, space, boundary = piece_bytes(sp, w["tok_emb.weight"].shape[0])
    n = min((tokens.size - 1) // seq_len, max_seqs)
    nats, nbytes = 0.0, 0
    with torch.inference_mode():
        for s in range(n):
            chunk = torch.from_numpy(tokens[s * seq_len : (s + 1) * seq_len + 1].astype(np.int64))
            x, y = chunk[:-1], chunk[1:]
            logits = forward(w, x[None], layers)[0]
            nats += float(F.cross_entropy(logits.float(), y, reduction="none").double().sum())
            xs, ys = x.numpy(), y.numpy()
            nbytes += int((base[ys] + (space[ys] & ~boundary[xs])).sum())
    return nats / math.log(2) / nbytes, n * seq_len


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="model.pgp")
    ap.add_argument("--val", default="tiny_val_000000.bin")
    ap.add_argument("--tokenizer", default="tiny_sp512.model")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-seqs", type=int, default=8)
    a = ap.parse_args()
    t0 = time.perf_counter()
    w = {k: v.float() for k, v in pgp_decode.load(a.artifact).items()}
    t1 = time.perf_counter()
    tokens = np.fromfile(a.val, dtype="<u2", offset=1024)  # challenge shard: 256 int32 header words
    bpb, n = val_bpb(w, tokens, spm.SentencePieceProcessor(model_file=a.tokenizer), a.seq_len, a.max_seqs)
    print(f"loaded {len(w)} tensors in {t1 - t0:.2f} s; val_bpb {bpb:.5f} on {n} tokens")


if __name__ == "__main__":
    main()
