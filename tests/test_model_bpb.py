"""Reference GPT, token shards and BPB evaluation (pgolf_pack.calib.model / shards / bpb)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pgolf_pack.calib import GPT, GPTConfig, evaluate_bpb, load_model, load_tokens, read_shard, token_byte_luts, write_shard
from pgolf_pack.calib.shards import HEADER_BYTES, SHARD_MAGIC
from pgolf_pack.errors import PgolfError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# ---------------------------------------------------------------- shards


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint16, st.integers(0, 3000)))
def test_shard_roundtrip(tmp_path_factory, tokens):
    path = tmp_path_factory.mktemp("shard") / "s.bin"
    write_shard(path, tokens)
    back = read_shard(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size


def test_shard_layout_is_the_challenge_format(tmp_path):
    path = tmp_path / "x.bin"
    write_shard(path, np.array([1, 2, 65535, 300], dtype=np.int64))
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 4]
    assert not header[3:].any()
    assert list(np.frombuffer(raw[1024:], dtype="<u2")) == [1, 2, 65535, 300]
    assert raw[1024:1026] == b"\x01\x00"  # little-endian


def test_load_tokens_sorted_concat_and_max_tokens(tmp_path):
    write_shard(tmp_path / "val_000001.bin", np.arange(10, 15))
    write_shard(tmp_path / "val_000000.bin", np.arange(0, 7))
    write_shard(tmp_path / "other_000000.bin", np.arange(100, 103))
    pattern = str(tmp_path / "val_*.bin")
    np.testing.assert_array_equal(load_tokens(pattern), np.r_[np.arange(0, 7), np.arange(10, 15)])
    np.testing.assert_array_equal(load_tokens(pattern, max_tokens=9), np.r_[np.arange(0, 7), 10, 11])
    np.testing.assert_array_equal(load_tokens(pattern, max_tokens=3), np.arange(0, 3))
    np.testing.assert_array_equal(load_tokens(tmp_path / "other_000000.bin"), np.arange(100, 103))


def test_shard_errors(tmp_path):
    with pytest.raises(PgolfError, match="not found"):
        read_shard(tmp_path / "missing.bin")
    with pytest.raises(PgolfError, match="no token shards match"):
        load_tokens(str(tmp_path / "nothing_*.bin"))
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(50))
    raw = good.read_bytes()

    bad_magic = tmp_path / "bad_magic.bin"
    bad_magic.write_bytes(np.int32(123).tobytes() + raw[4:])
    with pytest.raises(PgolfError, match="magic"):
        read_shard(bad_magic)
    bad_version = tmp_path / "bad_version.bin"
    bad_version.write_bytes(raw[:4] + np.int32(7).tobytes() + raw[8:])
    with pytest.raises(PgolfError, match="version"):
        read_shard(bad_version)
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(PgolfError, match="truncated"):
        read_shard(truncated)
    short_header = tmp_path / "short.bin"
    short_header.write_bytes(raw[:100])
    with pytest.raises(PgolfError, match="truncated"):
        read_shard(short_header)
    trailing = tmp_path / "trailing.bin"
    trailing.write_bytes(raw + b"\0\0")
    with pytest.raises(PgolfError, match="trailing"):
        read_shard(trailing)

    for bad in (np.array([-1, 2]), np.array([70000]), np.zeros((2, 2), dtype=np.int64), np.array([0.5])):
        with pytest.raises(PgolfError):
            write_shard(tmp_path / "w.bin", bad)
    assert not (tmp_path / "w.bin").exists()


# ---------------------------------------------------------------- model

TINY = GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)


def _random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A GPT with every parameter random (zero-init projections would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith(("scale", "mix", "skip_weights", "q_gain")) else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("q_gain") else 0.0))
    return model.eval()


def _rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.finfo(np.float32).eps)


def _numpy_forward(sd: dict[str, np.ndarray], cfg: GPTConfig, idx: np.ndarray) -> np.ndarray:
    """Float64 forward pass of one sequence with explicit per-head loops, written from the architecture notes."""
    t = idx.shape[0]
    hd = cfg.head_dim
    half = hd // 2
    inv = 1.0 / cfg.rope_base ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v: (t, hd)
        a, b = v[:, :half], v[:, half:]
        return np.concatenate([a * cos + b * sin, b * cos - a * sin], axis=1)

    def block(i, x, x0):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        x = p("resid_mix")[0] * x + p("resid_mix")[1] * x0
        h = _rms(x)
        q, k, v = h @ p("attn.c_q.weight").T, h @ p("attn.c_k.weight").T, h @ p("attn.c_v.weight").T
        out = np.zeros_like(x)
        group = cfg.num_heads // cfg.num_kv_heads
        for head in range(cfg.num_heads):
            kvh = head // group
            qh = rope(_rms(q[:, head * hd:(head + 1) * hd])) * p("attn.q_gain")[head]
            kh = rope(_rms(k[:, kvh * hd:(kvh + 1) * hd]))
            vh = v[:, kvh * hd:(kvh + 1) * hd]
            for pos in range(t):
                s = kh[: pos + 1] @ qh[pos] / math.sqrt(hd)
                w = np.exp(s - s.max())
                out[pos, head * hd:(head + 1) * hd] = (w / w.sum()) @ vh[: pos + 1]
        x = x + p("attn_scale") * (out @ p("attn.proj.weight").T)
        hidden = np.maximum(_rms(x) @ p("mlp.fc.weight").T, 0.0) ** 2
        return x + p("mlp_scale") * (hidden @ p("mlp.proj.weight").T)

    x0 = x = _rms(sd["tok_emb.weight"][idx])
    n_enc = cfg.num_layers // 2
    skips = []
    for i in range(n_enc):
        x = block(i, x, x0)
        skips.append(x)
    for j in range(cfg.num_layers - n_enc):
        if skips:
            x = x + sd["skip_weights"][j] * skips.pop()
        x = block(n_enc + j, x, x0)
    logits = _rms(x) @ sd["tok_emb.weight"].T
    return cfg.logit_softcap * np.tanh(logits / cfg.logit_softcap)


def test_forward_matches_explicit_numpy_reference():
    model = _random_model(TINY, seed=1)
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    idx = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(idx).double().numpy()
    for b in range(2):
        want = _numpy_forward(sd, TINY, idx[b].numpy())
        np.testing.assert_allclose(got[b], want, rtol=2e-4, atol=2e-4)


def test_parameter_names_are_the_baseline_names():
    names = set(GPT(GPTConfig(vocab_size=16, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1)).state_dict())
    per_block = ["attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.c_q.weight", "attn.c_k.weight",
                 "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"]
    assert names == {"tok_emb.weight", "skip_weights"} | {f"blocks.{i}.{n}" for i in range(2) for n in per_block}


@pytest.mark.parametrize("cfg", [
    TINY,
    GPTConfig(vocab_size=40, num_layers=4, model_dim=64, num_heads=2, num_kv_heads=2, mlp_mult=3),
    GPTConfig(vocab_size=40, num_layers=1, model_dim=48, num_heads=6, num_kv_heads=1, tie_embeddings=False),
])
def test_config_inferred_from_state_dict(cfg):
    sd = GPT(cfg).state_dict()
    assert GPTConfig.from_state_dict(sd) == cfg
    model = load_model(_random_model(cfg).state_dict())
    assert model.config == cfg


def test_config_overrides_and_fallback_heads():
    sd = GPT(TINY).state_dict()
    assert GPTConfig.from_state_dict(sd, logit_softcap=15.0).logit_softcap == 15.0
    with pytest.raises(PgolfError, match="unknown GPT config"):
        GPTConfig.from_state_dict(sd, not_a_field=1)
    big = {k: v for k, v in GPT(GPTConfig(vocab_size=8, num_layers=1, model_dim=128, num_heads=2, num_kv_heads=1)).state_dict().items()
           if not k.endswith("q_gain")}
    cfg = GPTConfig.from_state_dict(big)  # no q_gain: head_dim 64 is assumed
    assert (cfg.num_heads, cfg.num_kv_heads) == (2, 1)
    with pytest.raises(PgolfError, match="divisible"):
        GPTConfig.from_state_dict(sd, num_heads=3)


def test_load_model_is_strict_and_exact():
    src = _random_model(TINY, seed=3)
    sd = src.state_dict()
    model = load_model(sd)
    idx = torch.randint(0, TINY.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(idx), src(idx))
    bf16 = {k: v.bfloat16() for k, v in sd.items()}  # like the baseline's export of tok_emb
    assert load_model(bf16)(idx).dtype == torch.float32
    with pytest.raises(PgolfError, match="missing blocks.0.attn.c_q.weight"):
        load_model({k: v for k, v in sd.items() if k != "blocks.0.attn.c_q.weight"})
    with pytest.raises(PgolfError, match="unexpected extra.weight"):
        load_model({**sd, "extra.weight": torch.zeros(2)})
    with pytest.raises(PgolfError, match="shape"):
        load_model({**sd, "blocks.1.mlp.fc.weight": torch.zeros(65, 32)})
    with pytest.raises(PgolfError, match="tok_emb"):
        load_model({k: v for k, v in sd.items() if k != "tok_emb.weight"})


def test_causal_loss_and_bf16_autocast():
    model = _random_model(TINY, seed=4)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=g)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
        assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
        assert not torch.allclose(a[:, 10:], b[:, 10:])
        tgt = torch.randint(0, TINY.vocab_size, (2, 16), generator=g)
        manual = -torch.log_softmax(a.double(), -1).gather(-1, tgt[..., None]).mean()
        assert abs(float(model.loss(idx, tgt)) - float(manual)) < 1e-5
        assert a.abs().max() < TINY.logit_softcap
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = model(idx)
        assert c.dtype == torch.bfloat16
        assert (c.float() - a).abs().max() < 0.1 * a.abs().max()


def test_baseline_bf16_runs_like_the_baselines_bf16_module():
    src = _random_model(TINY, seed=6)
    sd = src.state_dict()
    model = load_model(sd, baseline_bf16=True)
    idx = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(idx)
        assert out.dtype == torch.bfloat16  # bf16 all the way without autocast, as in the baseline
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(idx), out)
        assert (out.float() - src(idx)).abs().max() < 0.1 * src(idx).abs().max()
    cos, _ = model.blocks[0].attn.rotary(300, torch.device("cpu"), torch.float32)
    # bf16 positions: 257 rounds to 256, so both rows of the table agree
    assert torch.equal(cos[0, 0, 257], cos[0, 0, 256])
    cos32, _ = src.blocks[0].attn.rotary(300, torch.device("cpu"), torch.float32)
    assert not torch.equal(cos32[0, 0, 257], cos32[0, 0, 256])


# ---------------------------------------------------------------- BPB

DOCS = [
    "The quick brown fox jumps over the lazy dog 42 times.",
    "Caf\u00e9 owners in Z\u00fcrich sold 1234 cups of coffee \U0001f600 on Monday.",
    "Free software licenses grant the freedom to copy, change and share programs.",
    "Numbers like 3.14159 and 2718 are split into single digits by the tokenizer.",
    "A tokenizer maps text to pieces; each piece stands for some bytes of UTF-8 text.",
    "\U0001f680 Rockets and \u00e9l\u00e8ves: byte fallback covers the rare characters.",
]


@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(DOCS * 20 + [" ".join(reversed(s.split())) for s in DOCS] * 10) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tiny"), model_type="bpe", vocab_size=320,
        character_coverage=0.98, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    path = d / "tiny.model"
    return path, spm.SentencePieceProcessor(model_file=str(path))


def _stream(sp, docs):
    out = []
    for d in docs:
        out.append(1)
        out.extend(sp.encode(d))
    return np.asarray(out, dtype=np.int64)


class BigramTable(torch.nn.Module):
    """A real (if weak) language model: logits depend only on the previous token."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2)

    def forward(self, idx):
        return self.table[idx]


def test_byte_luts(tiny_sp):
    path, sp = tiny_sp
    luts = token_byte_luts(path, 330)
    assert luts.base_bytes.size == 330
    for special in (0, 1, 2, 3):
        assert luts.is_boundary[special] and luts.base_bytes[special] == 0
    assert luts.is_boundary[320:].all()  # ids past the tokenizer's vocab
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(luts.base_bytes[i] == 1 for i in byte_ids)
    spaced = [i for i in range(4, sp.vocab_size()) if not sp.is_byte(i) and sp.id_to_piece(i).startswith("\u2581")]
    assert spaced
    for i in spaced:
        assert luts.has_leading_space[i]
        assert luts.base_bytes[i] == len(sp.id_to_piece(i)[1:].encode("utf-8"))
    plain = [i for i in range(4, sp.vocab_size()) if not sp.is_byte(i) and not sp.id_to_piece(i).startswith("\u2581")]
    assert plain and not luts.has_leading_space[plain].any()
    with pytest.raises(PgolfError, match="not found"):
        token_byte_luts(path.parent / "nope.model", 10)


def test_bytes_equal_utf8_length_of_the_text(tiny_sp):
    path, sp = tiny_sp
    for d in DOCS:  # the test texts survive nmt_nfkc unchanged, so their UTF-8 length is the truth
        assert sp.decode(sp.encode(d)) == d
    assert any(sp.is_byte(t) for t in sp.encode(DOCS[1]))  # byte fallback is exercised
    toks = _stream(sp, DOCS)
    res = evaluate_bpb(BigramTable(sp.vocab_size(), 0), toks, path, seq_len=toks.size - 1)
    assert res["tokens"] == toks.size - 1
    # Every document's bytes are scored: the first BOS is only ever an input.
    assert res["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS)


@pytest.mark.parametrize("seq_len,batch_seqs,max_seqs", [(16, 1, None), (16, 3, None), (7, 2, 5), (50, 8, None)])
def test_loss_and_bpb_match_hand_computation(tiny_sp, seq_len, batch_seqs, max_seqs):
    path, sp = tiny_sp
    toks = _stream(sp, DOCS * 2)
    model = BigramTable(sp.vocab_size(), 7)
    table = model.table.detach().double().numpy()
    n_seqs = (toks.size - 1) // seq_len if max_seqs is None else max_seqs
    nll, nbytes = 0.0, 0
    for s in range(n_seqs):
        for j in range(seq_len):
            p, t = int(toks[s * seq_len + j]), int(toks[s * seq_len + j + 1])
            row = table[p]
            nll += math.log(np.exp(row - row.max()).sum()) + row.max() - row[t]
            if sp.is_byte(t):
                nbytes += 1
            elif not (sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t)):
                piece = sp.id_to_piece(t)
                prev_is_boundary = sp.is_control(p) or sp.is_unknown(p) or sp.is_unused(p)
                if piece.startswith("\u2581") and prev_is_boundary:
                    piece = piece[1:]
                nbytes += len(piece.replace("\u2581", " ").encode("utf-8"))
    calls = []
    res = evaluate_bpb(model, toks, path, seq_len=seq_len, batch_seqs=batch_seqs, max_seqs=max_seqs,
                       progress=lambda done, total: calls.append((done, total)))
    assert res["seqs"] == n_seqs and res["tokens"] == n_seqs * seq_len
    assert res["bytes"] == nbytes
    assert res["loss"] == pytest.approx(nll / (n_seqs * seq_len), rel=1e-6)
    assert res["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
    assert calls[-1] == (n_seqs, n_seqs) and len(calls) == math.ceil(n_seqs / batch_seqs)
    assert model.training  # evaluation restores the training flag


def test_evaluate_gpt_matches_its_own_loss(tiny_sp):
    path, sp = tiny_sp
    cfg = GPTConfig(vocab_size=sp.vocab_size(), num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    model = _random_model(cfg, seed=9)
    toks = _stream(sp, DOCS * 3)
    seq = 32
    n = (toks.size - 1) // seq
    t = torch.from_numpy(toks[: n * seq + 1])
    with torch.no_grad():
        want = float(model.loss(t[:-1].view(n, seq), t[1:].view(n, seq)))
    res = evaluate_bpb(model, toks.astype(np.uint16), path, seq_len=seq, batch_seqs=3)
    assert res["loss"] == pytest.approx(want, rel=1e-5)
    res_bf16 = evaluate_bpb(model, toks, path, seq_len=seq, autocast_bf16=True)
    assert res_bf16["bpb"] == pytest.approx(res["bpb"], rel=0.05)


def test_evaluate_errors(tiny_sp):
    path, sp = tiny_sp
    toks = _stream(sp, DOCS)
    model = BigramTable(sp.vocab_size(), 0)
    with pytest.raises(PgolfError, match="need more than"):
        evaluate_bpb(model, toks[:10], path, seq_len=16)
    with pytest.raises(PgolfError, match="outside the vocab"):
        evaluate_bpb(model, np.r_[toks, 5000], path, seq_len=toks.size)
    with pytest.raises(PgolfError, match="does not match the tokenizer"):
        evaluate_bpb(GPT(TINY), toks, path, seq_len=16)
    with pytest.raises(PgolfError, match="tokenizer model not found"):
        evaluate_bpb(model, toks, path.parent / "missing.model", seq_len=16)


# ---------------------------------------------------------------- bundled example


def test_bundled_example_reproduces_its_summary():
    from pgolf_pack.checkpoint import load_checkpoint

    summary = json.loads((EXAMPLES / "tiny_train_summary.json").read_text())
    model = load_model(load_checkpoint(EXAMPLES / "tiny_gpt.safetensors"))
    assert model.config.to_dict() == summary["config"]
    val = read_shard(EXAMPLES / "tiny_val_000000.bin")
    assert val.size <= 30_000 and val[0] == 1
    assert read_shard(EXAMPLES / "tiny_train_000000.bin")[0] == 1
    res = evaluate_bpb(model, val, EXAMPLES / "tiny_sp512.model", seq_len=summary["seq_len"])
    assert res["bpb"] == pytest.approx(summary["final_val_bpb"], abs=1e-4)
    assert res["loss"] < summary["unigram_val_loss"] - 1.0
