"""End-to-end CLI runs on the bundled example: a really trained baseline-architecture GPT."""

import json
from pathlib import Path

import pytest

from conftest import EX_CKPT as CKPT
from conftest import EX_TOKENIZER as SP
from conftest import EX_TRAIN as TRAIN
from conftest import EX_VAL as VAL
from conftest import cli, cli_ok, one_line_error


@pytest.fixture(scope="module")
def hessians(tmp_path_factory):
    out = tmp_path_factory.mktemp("h") / "H.safetensors"
    res = cli_ok("calibrate", CKPT, "--tokens", TRAIN, "-o", out, "--seqs", 8, "--seq-len", 256, "--json")
    assert res["tensors"] == 4 * 6 + 1  # every block matrix plus the tied embedding
    return out


def bpb(path):
    return cli_ok("eval", path, "--tokens", VAL, "--tokenizer", SP, "--seq-len", 256, "--max-seqs", 12, "--json")["bpb"]


def test_gptq_beats_rtn_on_bpb_and_eval_reads_artifacts(tmp_path, hessians):
    fp = bpb(CKPT)
    rtn = tmp_path / "rtn.pgp"
    gptq = tmp_path / "gptq.pgp"
    cli_ok("quantize", CKPT, "-o", rtn, "--bits", 4, "--codec", "auto-fast", "--json")
    cli_ok("quantize", CKPT, "-o", gptq, "--bits", 4, "--method", "gptq", "--hessians", hessians, "--codec", "auto-fast", "--json")
    b_rtn, b_gptq = bpb(rtn), bpb(gptq)
    assert fp < b_gptq < b_rtn
    v = cli_ok("verify-roundtrip", gptq, "--against", CKPT, "--json")
    assert v["ok"]


def test_lqer_and_row_tiers_through_the_cli(tmp_path, hessians):
    base = cli_ok("quantize", CKPT, "-o", tmp_path / "a.pgp", "--bits", 4, "--codec", "auto-fast", "--json")
    lq = cli_ok("quantize", CKPT, "-o", tmp_path / "b.pgp", "--bits", 4, "--codec", "auto-fast", "--lqer-top-k", 2,
                "--lqer-rank", 4, "--lqer-weighted", "chol", "--hessians", hessians, "--json")
    err = lambda rep: {t["name"]: t["rel_error"] for t in rep["tensors"]}
    touched = [t for t in lq["tensors"] if "lqer" in t["scheme"]]
    assert len(touched) == 2
    for t in touched:
        assert err(lq)[t["name"]] < err(base)[t["name"]]
    assert lq["total_bytes"] > base["total_bytes"]  # the factors are counted

    def tiers(name, *extra):
        rep = cli_ok("quantize", CKPT, "-o", tmp_path / name, "--bits", 4, "--codec", "auto-fast",
                     "--row-bits", "10%:8,rest:5", *extra, "--json")
        emb = next(t for t in rep["tensors"] if t["name"] == "tok_emb.weight")
        return rep, emb

    rep, emb = tiers("c.pgp", "--tokens", TRAIN)
    flat, emb_flat = tiers("d.pgp")
    assert emb["scheme"] == emb_flat["scheme"] == "rtn rows 10%:8,rest:5"
    # Tiers of int8 and int5 cost more bytes than the int4 embedding of --bits 4 and err less.
    emb_int4 = next(t for t in base["tensors"] if t["name"] == "tok_emb.weight")
    assert emb["bytes"] > emb_int4["bytes"] and emb["rel_error"] < emb_int4["rel_error"]
    stored = next(t for t in cli_ok("inspect", tmp_path / "c.pgp", "--json")["tensors"] if t["name"] == "tok_emb.weight")
    assert stored["scheme"] == "introws"
    assert [(p["bits"], p["rows"]) for p in stored["params"]["tiers"]] == [(8, 51), (5, 461)]
    # The token counts take effect: they choose which rows get the int8 tier.
    assert (tmp_path / "c.pgp").read_bytes() != (tmp_path / "d.pgp").read_bytes()
    assert {t["name"] for t in rep["tensors"]} == {t["name"] for t in flat["tensors"]}
    for name in ("b.pgp", "c.pgp"):
        assert cli_ok("verify-roundtrip", tmp_path / name, "--against", CKPT, "--json")["ok"]


def test_budget_is_never_exceeded_and_recipe_reproduces(tmp_path):
    out = tmp_path / "bud.pgp"
    res = cli_ok("quantize", CKPT, "-o", out, "--budget", 260_000, "--codec", "auto-fast", "--json")
    assert res["total_bytes"] == out.stat().st_size <= 260_000
    rec = Path(res["recipe"])
    assert rec == tmp_path / "bud.pgp.recipe.toml" and rec.is_file()
    again = tmp_path / "again.pgp"
    cli_ok("quantize", CKPT, "-o", again, "--recipe", rec, "--codec", "auto-fast", "--json")
    assert again.read_bytes() == out.read_bytes()


def test_budget_that_cannot_be_met(tmp_path):
    one_line_error(cli("quantize", CKPT, "-o", tmp_path / "x.pgp", "--budget", 1000), "cannot be met")
    assert not list(tmp_path.iterdir())


def test_sensitivity_measures_every_matrix_on_train_tokens(tmp_path, hessians):
    out = tmp_path / "sens.json"
    res = cli_ok("sensitivity", CKPT, "--hessians", hessians, "--tokens", TRAIN, "-o", out, "--seqs", 1, "--seq-len", 256, "--json")
    sens = json.loads(out.read_text())
    assert res["sensitivity"] == sens and res["tokens"] == 256
    assert len(sens) == 4 * 6 + 1 and "tok_emb.weight" in sens
    assert all(0 < v < float("inf") for v in sens.values())
    again = tmp_path / "again.json"
    cli_ok("sensitivity", CKPT, "--hessians", hessians, "--tokens", TRAIN, "-o", again, "--seqs", 1, "--seq-len", 256)
    assert json.loads(again.read_text()) == sens  # same seed, same window, same numbers
    one_line_error(cli("sensitivity", CKPT, "--hessians", hessians, "--tokens", TRAIN, "-o", tmp_path / "x.json",
                       "--seqs", 100000), "need")
    assert not (tmp_path / "x.json").exists()
