"""Train the bundled example: a small GPT in the Parameter Golf baseline architecture.

Everything it needs ships with Debian and this repository: the English license texts in
/usr/share/common-licenses (package base-files), Python, torch, numpy, sentencepiece and
safetensors. No network. Run from the repository root:

    python examples/train_example.py            # writes into examples/

Steps: split the texts into documents, hash-split them into train/val, train a sentencepiece BPE
tokenizer with the challenge's options on the train documents, write challenge-format shards
(every document starts with BOS=1), train the model on CPU with AdamW, evaluate val loss / BPB
exactly as the challenge does, and save the checkpoint plus a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pgolf_pack.calib.bpb import evaluate_bpb, target_bytes, token_byte_luts  # noqa: E402
from pgolf_pack.calib import GPT, GPTConfig, load_model  # noqa: E402
from pgolf_pack.calib.shards import read_shard, write_shard  # noqa: E402
from pgolf_pack.checkpoint import save_safetensors  # noqa: E402
from pgolf_pack.fileio import atomic_write, atomic_write_bytes  # noqa: E402

LICENSE_DIR = Path("/usr/share/common-licenses")
# Every regular file in that folder on Debian 12 (base-files 12.4+deb12u11), with its sha256.
# GPL, LGPL and GFDL are symlinks to GPL-3, LGPL-3 and GFDL-1.3 and are not read twice.
SOURCES = {
    "Apache-2.0": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
    "Artistic": "b7fd9b73ea99602016a326e0b62e6646060d18febdd065ceca8bb482208c3d88",
    "BSD": "5d588eb3b157d52112afea935c88a7ff9efddc1e2d95a42c25d3b96ad9055008",
    "CC0-1.0": "a2010f343487d3f7618affe54f789f5487602331c0a8d03f49e9a7c547cf0499",
    "GFDL-1.2": "d8e94ae5fdb5433fcae2961aeb1a8cf17174d6f4a0465d24bf37dd8a038bd439",
    "GFDL-1.3": "110535522396708cea37c72a802c5e7e81391139f5f7985631c93ef242b206a4",
    "GPL-1": "d77d235e41d54594865151f4751e835c5a82322b0e87ace266567c3391a4b912",
    "GPL-2": "8177f97513213526df2cf6184d8ff986c675afb514d4e68a404010521b880643",
    "GPL-3": "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986",
    "LGPL-2": "681e386e44a19d7d0674b4320272c90e66b6610b741e7e6305f8219c42e85366",
    "LGPL-2.1": "dc626520dcd53a22f727af3ee42c770e56c97a64fe3adb063799d8ab032fe551",
    "LGPL-3": "e3a994d82e644b03a792a930f574002658412f62407f5fee083f2555c5f23118",
    "MPL-1.1": "f849fc26a7a99981611a3a370e83078deb617d12a45776d6c4cada4d338be469",
    "MPL-2.0": "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85",
}

DOC_CHARS = 1500  # documents of about this size give the hash split enough pieces to work with
VAL_PERCENT = 10
VOCAB = 512
BOS = 1
CONFIG = GPTConfig(vocab_size=VOCAB, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=2)


def read_sources(strict: bool) -> list[tuple[str, str]]:
    texts = []
    for name, digest in SOURCES.items():
        path = LICENSE_DIR / name
        if not path.is_file():
            raise SystemExit(f"missing source text {path} (package base-files)")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != digest:
            msg = f"{path} differs from the Debian 12 copy the committed example was trained on"
            if strict:
                raise SystemExit(msg)
            print(f"warning: {msg}; outputs will not match the committed files", flush=True)
        texts.append((name, raw.decode("utf-8")))
    return texts


def split_documents(text: str) -> list[str]:
    """Group blank-line separated paragraphs into documents of about DOC_CHARS characters."""
    paras = [p for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").strip("\n")) if p.strip()]
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        cur.append(p)
        size += len(p) + 2
        if size >= DOC_CHARS:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        # A short tail joins the previous document rather than being dropped.
        if docs and len(tail) < DOC_CHARS // 4:
            docs[-1] = docs[-1] + "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def is_val(doc: str) -> bool:
    # Identical paragraphs groups (shared by GPL/LGPL versions) hash alike, so never straddle splits.
    return int(hashlib.sha256(doc.encode("utf-8")).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def train_tokenizer(train_docs: list[str], out_model: Path) -> None:
    import io

    import sentencepiece as spm

    lines = [line for d in train_docs for line in d.split("\n") if line.strip()]
    # In-memory input and output keep temp paths out of the model file, so it is byte-reproducible.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    atomic_write_bytes(out_model, model.getvalue())


def encode_docs(sp, docs: list[str]) -> np.ndarray:
    out: list[int] = []
    for d in docs:
        out.append(BOS)
        out.extend(sp.encode(d))
    return np.asarray(out, dtype=np.int64)


def unigram_baseline(train: np.ndarray, val: np.ndarray, luts) -> tuple[float, float]:
    """Val cross entropy (nats/token) and BPB of add-one smoothed train token frequencies."""
    counts = np.bincount(train, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    y = val[1:]
    nll = -logp[y].sum()
    nbytes = target_bytes(luts, val[:-1], y).sum()
    return float(nll / y.size), float(nll / math.log(2) / nbytes)


def batches(train: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, train.numel() - seq_len - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        win = train[idx]
        yield win[:, :-1], win[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(train: np.ndarray, val: np.ndarray, sp_path: Path, args) -> tuple[GPT, list[dict]]:
    torch.manual_seed(args.seed)
    model = GPT(CONFIG)
    model.reset_parameters(torch.Generator().manual_seed(args.seed))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and name.startswith("blocks.") else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed + 1)
    stream = batches(torch.from_numpy(train), args.seq_len, args.batch, gen)
    log: list[dict] = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(stream)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ev = evaluate_bpb(model, val, sp_path, seq_len=args.seq_len)
            model.train()
            rec = {"step": step + 1, "train_loss": loss.item(), "val_loss": ev["loss"], "val_bpb": ev["bpb"],
                   "lr": lr, "seconds": time.perf_counter() - t0}
            log.append(rec)
            print(f"step {step + 1:4d}  train {rec['train_loss']:.4f}  val {ev['loss']:.4f}  "
                  f"val_bpb {ev['bpb']:.4f}  lr {lr:.2e}  {rec['seconds']:.0f}s", flush=True)
    return model.eval(), log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strict", action="store_true", help="fail if a source text differs from the pinned hash")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    docs: list[str] = []
    for _, text in read_sources(args.strict):
        docs.extend(split_documents(text))
    train_docs = [d for d in docs if not is_val(d)]
    val_docs = [d for d in docs if is_val(d)]
    print(f"{len(docs)} documents, {sum(len(d.encode()) for d in docs):,} UTF-8 bytes; "
          f"train {len(train_docs)}, val {len(val_docs)}", flush=True)

    sp_path = out / f"tiny_sp{VOCAB}.model"
    train_tokenizer(train_docs, sp_path)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert int(sp.vocab_size()) == VOCAB, sp.vocab_size()
    train = encode_docs(sp, train_docs)
    val = encode_docs(sp, val_docs)
    write_shard(out / "tiny_train_000000.bin", train)
    write_shard(out / "tiny_val_000000.bin", val)
    # Train and evaluate on exactly what the shards hold.
    train = read_shard(out / "tiny_train_000000.bin").astype(np.int64)
    val = read_shard(out / "tiny_val_000000.bin").astype(np.int64)
    print(f"train tokens {train.size:,}, val tokens {val.size:,}", flush=True)

    luts = token_byte_luts(sp_path, VOCAB)
    uni_loss, uni_bpb = unigram_baseline(train, val, luts)
    print(f"unigram baseline: val loss {uni_loss:.4f} nats/token, val BPB {uni_bpb:.4f}", flush=True)

    model, log = train_model(train, val, sp_path, args)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    ckpt = out / "tiny_gpt.safetensors"
    save_safetensors(sd, ckpt, metadata={"format": "pt", "gpt_config": CONFIG.to_dict()})

    # Final figures come from the saved file, the way users will load it.
    from pgolf_pack.checkpoint import load_checkpoint

    reloaded = load_model(load_checkpoint(ckpt))
    val_ev = evaluate_bpb(reloaded, val, sp_path, seq_len=args.seq_len)
    n_train_seqs = min((train.size - 1) // args.seq_len, val_ev["seqs"] * 2)
    train_ev = evaluate_bpb(reloaded, train, sp_path, seq_len=args.seq_len, max_seqs=n_train_seqs)
    summary = {
        "sources": [str(LICENSE_DIR / n) for n in SOURCES],
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train": int(train.size), "val": int(val.size)},
        "config": CONFIG.to_dict(),
        "params": int(sum(p.numel() for p in reloaded.parameters())),
        "optimizer": "AdamW", "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay, "seed": args.seed,
        "train_tokens_seen": args.steps * args.batch * args.seq_len,
        "unigram_val_loss": uni_loss, "unigram_val_bpb": uni_bpb,
        "final_train_loss": train_ev["loss"], "final_train_bpb": train_ev["bpb"], "train_eval_tokens": train_ev["tokens"],
        "final_val_loss": val_ev["loss"], "final_val_bpb": val_ev["bpb"],
        "val_eval_tokens": val_ev["tokens"], "val_eval_bytes": val_ev["bytes"],
        "seconds": time.perf_counter() - t_start, "torch": torch.__version__,
        "log": log,
    }
    atomic_write(out / "tiny_train_summary.json", lambda p: p.write_text(json.dumps(summary, indent=1) + "\n"))
    print(f"final: train loss {train_ev['loss']:.4f}, val loss {val_ev['loss']:.4f}, val BPB {val_ev['bpb']:.4f} "
          f"(unigram {uni_loss:.4f} / {uni_bpb:.4f}); {summary['seconds']:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
