"""End-to-end CLI runs on the bundled example: a really trained baseline-architecture GPT."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pgolf_pack.cli import app

EX = Path(__file__).resolve().parents[1] / "examples"
CKPT = EX / "tiny_gpt.safetensors"
TRAIN = str(EX / "tiny_train_*.bin")
VAL = str(EX / "tiny_val_*.bin")
SP = EX / "tiny_sp512.model"
runner = CliRunner()


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.output) if "--json" in args else r.output


@pytest.fixture(scope="module")
def hessians(tmp_path_factory):
    out = tmp_path_factory.mktemp("h") / "H.safetensors"
    res = run("calibrate", CKPT, "--tokens", TRAIN, "-o", out, "--seqs", 8, "--seq-len", 256, "--json")
    assert res["tensors"] == 4 * 6 + 1  # every block matrix plus the tied embedding
    return out


def bpb(path):
    return run("eval", path, "--tokens", VAL, "--tokenizer", SP, "--seq-len", 256, "--max-seqs", 12, "--json")["bpb"]


def test_gptq_beats_rtn_on_bpb_and_eval_reads_artifacts(tmp_path, hessians):
    fp = bpb(CKPT)
    rtn = tmp_path / "rtn.pgp"
    gptq = tmp_path / "gptq.pgp"
    run("quantize", CKPT, "-o", rtn, "--bits", 4, "--codec", "auto-fast", "--json")
    run("quantize", CKPT, "-o", gptq, "--bits", 4, "--method", "gptq", "--hessians", hessians, "--codec", "auto-fast", "--json")
    b_rtn, b_gptq = bpb(rtn), bpb(gptq)
    assert fp < b_gptq < b_rtn
    v = run("verify-roundtrip", gptq, "--against", CKPT, "--json")
    assert v["ok"]


def test_lqer_and_row_tiers_through_the_cli(tmp_path, hessians):
    base = run("quantize", CKPT, "-o", tmp_path / "a.pgp", "--bits", 4, "--codec", "auto-fast", "--json")
    lq = run("quantize", CKPT, "-o", tmp_path / "b.pgp", "--bits", 4, "--codec", "auto-fast", "--lqer-top-k", 2,
             "--lqer-rank", 4, "--lqer-weighted", "chol", "--hessians", hessians, "--json")
    err = lambda rep: {t["name"]: t["rel_error"] for t in rep["tensors"]}
    touched = [t for t in lq["tensors"] if "lqer" in t["scheme"]]
    assert len(touched) == 2
    for t in touched:
        assert err(lq)[t["name"]] < err(base)[t["name"]]
    assert lq["total_bytes"] > base["total_bytes"]  # the factors are counted
    tiers = run("quantize", CKPT, "-o", tmp_path / "c.pgp", "--bits", 4, "--codec", "auto-fast",
                "--row-bits", "10%:8,rest:5", "--tokens", TRAIN, "--json")
    emb = next(t for t in tiers["tensors"] if t["name"] == "tok_emb.weight")
    assert "introws" in emb["scheme"] or "rtn" in emb["scheme"]
    for name in ("b.pgp", "c.pgp"):
        assert run("verify-roundtrip", tmp_path / name, "--against", CKPT, "--json")["ok"]


def test_budget_is_never_exceeded_and_recipe_reproduces(tmp_path):
    out = tmp_path / "bud.pgp"
    res = run("quantize", CKPT, "-o", out, "--budget", 260_000, "--codec", "auto-fast", "--json")
    assert out.stat().st_size <= 260_000
    rec = Path(res["recipe"])
    again = run("quantize", CKPT, "-o", tmp_path / "again.pgp", "--recipe", rec, "--codec", "auto-fast", "--json")
    assert again["total_bytes"] <= 260_000


def test_budget_that_cannot_be_met(tmp_path):
    r = runner.invoke(app, ["quantize", str(CKPT), "-o", str(tmp_path / "x.pgp"), "--budget", "1000"])
    assert r.exit_code == 1 and r.output.strip().startswith("error:") and "cannot be met" in r.output
    assert not (tmp_path / "x.pgp").exists()


def test_sensitivity_measures_every_matrix_on_train_tokens(tmp_path, hessians):
    out = tmp_path / "sens.json"
    res = run("sensitivity", CKPT, "--hessians", hessians, "--tokens", TRAIN, "-o", out, "--seqs", 1, "--seq-len", 256, "--json")
    sens = json.loads(out.read_text())
    assert res["sensitivity"] == sens and res["tokens"] == 256
    assert len(sens) == 4 * 6 + 1 and "tok_emb.weight" in sens
    assert all(0 < v < float("inf") for v in sens.values())
    again = tmp_path / "again.json"
    run("sensitivity", CKPT, "--hessians", hessians, "--tokens", TRAIN, "-o", again, "--seqs", 1, "--seq-len", 256)
    assert json.loads(again.read_text()) == sens  # same seed, same window, same numbers
    r = runner.invoke(app, ["sensitivity", str(CKPT), "--hessians", str(hessians), "--tokens", TRAIN, "-o",
                            str(tmp_path / "x.json"), "--seqs", "100000"])
    assert r.exit_code != 0 and "need" in r.output and not (tmp_path / "x.json").exists()
