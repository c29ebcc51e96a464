"""Your model, not ours: the whole recommended path through the CLI for two user architectures.

calibrate → sensitivity → quantize --method ecsq --sensitivity --budget → verify-roundtrip → eval,
for a custom architecture given by a factory and for a Parameter-Golf-style train_gpt.py that
the test really runs to train its checkpoint. Data: the bundled example's tokenizer and shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pgolf_pack.calib.hessian import load_hessians
from pgolf_pack.calib.shards import load_tokens
from pgolf_pack.cli import app

EX = Path(__file__).resolve().parents[1] / "examples"
MODELS = Path(__file__).resolve().parent / "models"
CUSTOM_LM = (MODELS / "custom_lm.py").read_text()
TRAIN_GPT = (MODELS / "train_gpt.py").read_text()
TRAIN = str(EX / "tiny_train_*.bin")
VAL = str(EX / "tiny_val_*.bin")
SP = EX / "tiny_sp512.model"
runner = CliRunner()
SEQ = ("--seq-len", 64)


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout) if "--json" in args else r.output


def one_line_error(args, text):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """The custom architecture, trained for a few steps on the example's train tokens."""
    d = tmp_path_factory.mktemp("custom")
    src = d / "custom_lm.py"
    src.write_text(CUSTOM_LM)
    ns: dict = {}
    exec(compile(CUSTOM_LM, str(src), "exec"), ns)
    torch.manual_seed(0)
    model = ns["TinyLM"](512)
    toks = torch.from_numpy(load_tokens(TRAIN).astype("int64"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        starts = torch.randint(0, toks.numel() - 65, (8,))
        x = torch.stack([toks[s:s + 64] for s in starts])
        y = torch.stack([toks[s + 1:s + 65] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x, y).reshape(-1, 512), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = d / "custom.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return d, ckpt, f"{src}:make_model"


@pytest.fixture(scope="module")
def pg_script(tmp_path_factory):
    """train_gpt.py run as its author runs it (NUM_LAYERS=2 over a default of 3), writing final_model.pt."""
    d = tmp_path_factory.mktemp("pg")
    script = d / "train_gpt.py"
    script.write_text(TRAIN_GPT)
    env = {**os.environ, "NUM_LAYERS": "2", "DATA_PATH": str(EX), "ITERATIONS": "15"}
    r = subprocess.run([sys.executable, str(script)], cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (d / "final_model.pt").is_file()
    return d, d / "final_model.pt", str(script)


def full_path(d: Path, ckpt: Path, model: str) -> dict:
    """The README's recommended path, with the user's model; returns what each step reported."""
    H, S, art = d / "H.safetensors", d / "S.json", d / "model.pgp"
    cal = run("calibrate", ckpt, "--model", model, "--tokens", TRAIN, "-o", H, "--seqs", 8, *SEQ, "--json")
    sens = run("sensitivity", ckpt, "--model", model, "--hessians", H, "--tokens", TRAIN, "-o", S, "--seqs", 2, *SEQ,
               "--json")
    budget = ckpt.stat().st_size // 8  # about 4 bits per float32 weight
    # zstd instead of the default entropy coder: every λ probe packs in a fraction of a second.
    q = run("quantize", ckpt, "-o", art, "--method", "ecsq", "--hessians", H, "--sensitivity", S, "--budget", budget,
            "--codec", "zstd", "--json")
    verify = run("verify-roundtrip", art, "--against", ckpt)
    ev = [run("eval", p, "--model", model, "--tokens", VAL, "--tokenizer", SP, *SEQ, "--max-seqs", 24, "--json")
          for p in (ckpt, art)]
    return {"calibrate": cal, "sensitivity": sens, "quantize": q, "budget": budget, "verify": verify,
            "eval": ev, "hessians": load_hessians(H)}


def test_custom_architecture_full_path(custom):
    d, ckpt, model = custom
    res = full_path(d, ckpt, model)
    hs, counts = res["hessians"]
    # Every matrix has a Hessian: Linear layers (biased or not), the F.linear matrix, the untied
    # head, and the lookup-only embedding (identity, scaled to its lookups per row).
    assert res["calibrate"]["no_hessian"] == []
    assert {"mix", "head.weight", "embed.weight", "layers.1.ffn.gate.weight", "layers.0.qkv.weight"} <= set(hs)
    assert counts["mix"] == counts["head.weight"] == 8 * 64
    emb = hs["embed.weight"]
    assert (emb == emb[0, 0] * torch.eye(64).numpy()).all() and emb[0, 0] == pytest.approx(8 * 64 / 512)
    sd_names = {"mix", "head.weight", "embed.weight"} | {f"layers.{i}.{m}.weight" for i in range(2)
                                                         for m in ("qkv", "out", "ffn.gate", "ffn.up", "ffn.down")}
    assert set(res["sensitivity"]["sensitivity"]) == sd_names
    assert res["quantize"]["bytes"] <= res["budget"]
    assert "re-pack byte-identical: yes" in res["verify"]
    fp, q = res["eval"]
    assert fp["tokens"] == q["tokens"] == 24 * 64
    assert fp["architecture"]["source"] == "make_model() from custom_lm.py"
    assert q["bpb"] != fp["bpb"] and abs(q["bpb"] - fp["bpb"]) < 0.1, (fp["bpb"], q["bpb"])
    # analyze rd scores its decoded points with the same model.
    rd = run("analyze", "rd", ckpt, "--model", model, "--hessians", d / "H.safetensors", "--tokens", VAL,
             "--tokenizer", SP, "--pipelines", "ecsq", "--points", 1, "--codec", "zstd", "--max-seqs", 24, *SEQ, "--json")
    assert rd["fp_bpb"] == pytest.approx(fp["bpb"], abs=1e-12)
    assert len(rd["points"]) == 1 and rd["points"][0]["bpb"] is not None


def test_parameter_golf_script_full_path(pg_script, monkeypatch):
    d, ckpt, script = pg_script
    monkeypatch.setenv("NUM_LAYERS", "2")  # as the training run had it
    res = full_path(d, ckpt, script)
    hs, _ = res["hessians"]
    # The tied head is found from its F.linear(x, tok_emb.weight) call, no flag needed.
    assert "tok_emb.weight" in hs and res["calibrate"]["no_hessian"] == []
    assert res["calibrate"]["model"]["settings"]["num_layers"] == 2
    assert len(res["sensitivity"]["sensitivity"]) == 2 * 4 + 1
    assert res["quantize"]["bytes"] <= res["budget"]
    assert "re-pack byte-identical: yes" in res["verify"]
    fp, q = res["eval"]
    assert fp["architecture"]["source"] == "GPT from train_gpt.py"
    assert q["bpb"] != fp["bpb"] and abs(q["bpb"] - fp["bpb"]) < 0.1, (fp["bpb"], q["bpb"])
    # Importing the script never ran its training: no second checkpoint appeared where the CLI ran.
    assert not Path("final_model.pt").exists()


def test_script_hyperparameters_come_from_the_environment(pg_script, monkeypatch):
    _, ckpt, script = pg_script
    monkeypatch.delenv("NUM_LAYERS", raising=False)  # the default, 3, is not what was trained
    msg = one_line_error(["eval", ckpt, "--model", script, "--tokens", VAL, "--tokenizer", SP, *SEQ],
                         "does not load strictly into GPT from train_gpt.py")
    assert "missing blocks.2." in msg
    monkeypatch.setenv("NUM_LAYERS", "2")
    out = run("eval", ckpt, "--model", script, "--tokens", VAL, "--tokenizer", SP, *SEQ, "--max-seqs", 2)
    assert "model: GPT from train_gpt.py (vocab_size=512, num_layers=2, model_dim=64, mlp_mult=2" in out


def test_user_errors_are_one_line(tmp_path, pg_script, monkeypatch):
    _, ckpt, script = pg_script
    monkeypatch.setenv("NUM_LAYERS", "2")
    gpu_only = tmp_path / "gpu_gpt.py"
    gpu_only.write_text("from flash_attn_interface import flash_attn_func\n" + TRAIN_GPT)
    msg = one_line_error(["eval", ckpt, "--model", gpu_only, "--tokens", VAL, "--tokenizer", SP],
                         "it imports 'flash_attn_interface'")
    assert "--model FILE.py:make_model" in msg
    tupled = tmp_path / "tupled.py"
    tupled.write_text(TRAIN_GPT.replace('reduction="mean")', 'reduction="mean"), logits'))
    one_line_error(["eval", ckpt, "--model", tupled, "--tokens", VAL, "--tokenizer", SP, *SEQ],
                   "forward returned a tuple of 2")
    one_line_error(["eval", ckpt, "--model", script, "--model-class", "Transformer", "--tokens", VAL, "--tokenizer", SP],
                   "no nn.Module class 'Transformer'; its nn.Module classes: Block, CastedLinear, GPT, RMSNorm")
    one_line_error(["calibrate", ckpt, "--model", f"{script}:build", "--tokens", TRAIN, "-o", tmp_path / "H.st"],
                   "has no function 'build'")
    one_line_error(["eval", ckpt, "--model", tmp_path / "nope.py", "--tokens", VAL, "--tokenizer", SP],
                   "file not found")
    one_line_error(["eval", ckpt, "--model", script, "--num-heads", 4, "--tokens", VAL, "--tokenizer", SP],
                   "--num-heads applies to the reference GPT only")
    bad_device = "tpu" if torch.cuda.is_available() else "cuda"
    one_line_error(["eval", ckpt, "--model", script, "--device", bad_device, "--tokens", VAL, "--tokenizer", SP],
                   "--device must be" if torch.cuda.is_available() else "no CUDA device is available")

def test_untraceable_weight_is_named(tmp_path, custom):
    d, ckpt, _ = custom
    # The same model with the F.linear matrix cast first: a new tensor, which no hook can trace.
    src = tmp_path / "cast_lm.py"
    src.write_text(CUSTOM_LM.replace("F.linear(x, self.mix)", "F.linear(x, self.mix.double().to(x.dtype))"))
    r = runner.invoke(app, ["calibrate", str(ckpt), "--model", f"{src}:make_model", "--tokens", TRAIN,
                            "-o", str(tmp_path / "H.st"), "--seqs", 2, "--seq-len", 64, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["no_hessian"] == ["mix"]
    assert "warning: no Hessian for mix (used through double):" in r.output


def test_tied_head_applied_by_matmul_needs_the_flag(tmp_path, pg_script, monkeypatch):
    _, ckpt, _ = pg_script
    monkeypatch.setenv("NUM_LAYERS", "2")
    src = tmp_path / "matmul_head.py"
    src.write_text(TRAIN_GPT.replace("F.linear(x, self.tok_emb.weight)", "x @ self.tok_emb.weight.T"))
    args = ["calibrate", ckpt, "--model", src, "--tokens", TRAIN, "--seqs", 2, *SEQ, "--json"]
    r = runner.invoke(app, [str(a) for a in args + ["-o", tmp_path / "H1.st"]])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["no_hessian"] == ["tok_emb.weight"]
    assert "no Hessian for tok_emb.weight (used through T)" in r.output
    assert "rerun with --tied-head final_norm=tok_emb.weight" in r.output
    res = run(*args, "-o", tmp_path / "H2.st", "--tied-head", "final_norm=tok_emb.weight")
    assert res["no_hessian"] == []
    hs, counts = load_hessians(tmp_path / "H2.st")
    assert counts["tok_emb.weight"] == 2 * 64 and hs["tok_emb.weight"].shape == (64, 64)
    one_line_error(args + ["-o", tmp_path / "H3.st", "--tied-head", "head_norm=tok_emb.weight"],
                   "tied LM head: model has no module named 'head_norm'")
