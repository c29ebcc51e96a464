"""Drive the real CLI commands (typer's CliRunner) on small generated checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import cli as run
from conftest import one_line_error


def test_quantize_verify_unpack_inspect(tmp_path, ckpt_path, state_dict):
    art = tmp_path / "m.pgp"
    r = run("quantize", ckpt_path, "-o", art, "--bits", 6, "--embed-bits", 8, "--codec", "auto-fast", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["total_bytes"] == art.stat().st_size
    assert sum(t["bytes"] for t in rep["tensors"]) + rep["header_bytes"] == rep["total_bytes"]
    names = [t["name"] for t in rep["tensors"]]
    assert sorted(names) == sorted(state_dict)

    r = run("verify-roundtrip", art, "--against", ckpt_path, "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.output)
    assert v["ok"] and v["repack_identical"] and v["checksums_ok"]
    errs = {t["name"]: t["rel_error"] for t in v["tensors"]}
    assert errs["skip_weights"] == 0.0
    assert 0 < errs["blocks.0.mlp.fc.weight"] < 0.1

    out = tmp_path / "deq.safetensors"
    r = run("unpack", art, "-o", out)
    assert r.exit_code == 0, r.output
    deq = load_file(str(out))
    for k, v0 in state_dict.items():
        assert deq[k].dtype == v0.dtype and deq[k].shape == v0.shape
    assert torch.equal(deq["blocks.0.attn_scale"], state_dict["blocks.0.attn_scale"])

    r = run("inspect", art, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["bytes"] == art.stat().st_size
    r = run("inspect", art)
    assert r.exit_code == 0 and "mlp.fc.weight" in r.output


def test_quantize_is_deterministic(tmp_path, ckpt_path):
    a, b = tmp_path / "a.pgp", tmp_path / "b.pgp"
    for p in (a, b):
        assert run("quantize", ckpt_path, "-o", p, "--codec", "auto-fast", "--json").exit_code == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("codec", ["brotli", "zstd", "lzma", "entropy", "raw", "lrzip"])
def test_each_codec_roundtrips(tmp_path, ckpt_path, codec):
    if codec == "lrzip" and shutil.which("lrzip") is None:
        pytest.skip("lrzip not installed")
    art = tmp_path / f"m_{codec}.pgp"
    r = run("quantize", ckpt_path, "-o", art, "--bits", 5, "--codec", codec, "--json")
    assert r.exit_code == 0, r.output
    r = run("verify-roundtrip", art, "--against", ckpt_path, "--json")
    assert r.exit_code == 0, r.output


def test_torch_save_checkpoint(tmp_path, state_dict):
    p = tmp_path / "final_model.pt"
    torch.save({"model": state_dict, "step": 3}, p)
    art = tmp_path / "m.pgp"
    assert run("quantize", p, "-o", art, "--codec", "zstd", "--json").exit_code == 0
    assert run("verify-roundtrip", art, "--against", p).exit_code == 0


def test_missing_checkpoint(tmp_path):
    r = run("quantize", tmp_path / "nope.safetensors", "-o", tmp_path / "x.pgp")
    one_line_error(r, "not found")
    assert not (tmp_path / "x.pgp").exists()


def test_non_checkpoint_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, I am not a model")
    one_line_error(run("quantize", p, "-o", tmp_path / "x.pgp"), "not a checkpoint")


def test_pickle_needing_code_is_refused(tmp_path):
    import pickle

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": np.ones(3)}, f)  # numpy objects need more than weights_only
    one_line_error(run("quantize", p, "-o", tmp_path / "x.pgp"), "weights-only")


def test_non_finite_weights(tmp_path, state_dict):
    state_dict["blocks.0.mlp.fc.weight"][0, 0] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file(state_dict, str(p))
    one_line_error(run("quantize", p, "-o", tmp_path / "x.pgp"), "non-finite")
    assert not list(tmp_path.glob("*.pgp")) and not list(tmp_path.glob(".*tmp"))


def test_refuses_to_overwrite_input(ckpt_path):
    before = ckpt_path.read_bytes()
    one_line_error(run("quantize", ckpt_path, "-o", ckpt_path), "overwrite")
    assert ckpt_path.read_bytes() == before


def test_unknown_recipe_name(tmp_path, ckpt_path):
    rec = tmp_path / "r.toml"
    rec.write_text('[[rule]]\nmatch = "blocks.99.*"\nbits = 4\n')
    one_line_error(run("quantize", ckpt_path, "-o", tmp_path / "x.pgp", "--recipe", rec), "matches no tensor")


def test_unknown_codec(tmp_path, ckpt_path):
    one_line_error(run("quantize", ckpt_path, "-o", tmp_path / "x.pgp", "--codec", "gzip"), "unknown codec")


def test_lrzip_missing(tmp_path, ckpt_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    one_line_error(run("quantize", ckpt_path, "-o", tmp_path / "x.pgp", "--codec", "lrzip"), "lrzip")
    assert not (tmp_path / "x.pgp").exists()


def test_gptq_without_hessians(tmp_path, ckpt_path):
    one_line_error(run("quantize", ckpt_path, "-o", tmp_path / "x.pgp", "--method", "gptq"), "Hessian")


@pytest.fixture
def artifact(tmp_path, ckpt_path):
    art = tmp_path / "m.pgp"
    assert run("quantize", ckpt_path, "-o", art, "--codec", "auto-fast", "--json").exit_code == 0
    return art


def test_truncated_artifact(tmp_path, artifact):
    blob = artifact.read_bytes()
    for cut in (3, 20, len(blob) // 2, len(blob) - 1):
        p = tmp_path / f"cut{cut}.pgp"
        p.write_bytes(blob[:cut])
        r = run("verify-roundtrip", p)
        one_line_error(r, "truncated" if cut != 20 else "")


def test_bit_flip_names_the_group(tmp_path, artifact):
    blob = bytearray(artifact.read_bytes())
    from pgolf_pack.pack.container import read_container

    manifest, payload = read_container(bytes(blob))
    start = len(blob) - len(payload)
    g = max(manifest["groups"], key=lambda g: g["length"])
    blob[start + g["offset"] + g["length"] // 2] ^= 0x10
    p = tmp_path / "flip.pgp"
    p.write_bytes(bytes(blob))
    one_line_error(run("verify-roundtrip", p), g["name"])
    one_line_error(run("unpack", p, "-o", tmp_path / "o.safetensors"), g["name"])
    assert not (tmp_path / "o.safetensors").exists()


def test_manifest_corruption(tmp_path, artifact):
    blob = bytearray(artifact.read_bytes())
    blob[15] ^= 0xFF
    p = tmp_path / "m2.pgp"
    p.write_bytes(bytes(blob))
    one_line_error(run("inspect", p), "manifest")


def test_not_an_artifact(tmp_path, ckpt_path):
    one_line_error(run("verify-roundtrip", ckpt_path), "not a pgolf-pack artifact")
    one_line_error(run("verify-roundtrip", tmp_path / "missing.pgp"), "not found")


# Every quantize option either takes effect on the path it is given to, or is refused before any
# work: exit 1, one error line, no traceback, nothing written.
REFUSED = [
    # recipe path, from flags
    (("--save-recipe", "r.toml"), "--save-recipe applies only with --budget"),
    (("--lam", 0.1), "--lam applies only to"),
    (("--sensitivity", "s.json"), "--sensitivity applies only to"),
    (("--clip", "absmax", "--sigmas", 12.0), "--sigmas applies only to --clip sdclip"),
    (("--clip", "mse", "--embed-sigmas", 12.0), "--embed-sigmas applies only to --clip sdclip"),
    (("--lqer-rank", 8), "--lqer-rank applies only with --lqer-top-k"),
    (("--lqer-bits", 3), "--lqer-bits applies only with --lqer-top-k"),
    (("--lqer-group", 32), "--lqer-group applies only with --lqer-top-k"),
    (("--lqer-weighted", "chol"), "--lqer-weighted applies only with --lqer-top-k"),
    (("--lqer-top-k", 1, "--lqer-weighted", "chol"), "needs Hessians"),
    (("--lqer-top-k", 1, "--lqer-weighted", "svd"), "--lqer-weighted must be none, diag or chol"),
    (("--tokens", "TOKENS"), "nothing asks for row_bits"),
    (("--embed-bits", 8, "--row-bits", "10%:8,rest:6"), "--embed-bits does not apply with --row-bits"),
    (("--row-bits", "10%:9,rest:6"), "--row-bits"),
    (("--clip", "huber"), "unknown clip"),
    (("--group-by", "layer"), "unknown grouping"),
    (("--method", "e8p", "--bits", 4), "--bits does not apply to --method e8p"),
    (("--method", "e8p", "--clip", "mse"), "--clip does not apply to --method e8p"),
    (("--method", "e8p", "--row-bits", "10%:8,rest:6"), "--row-bits does not apply to --method e8p"),
    (("--method", "e8p", "--embed-bits", 8), "--embed-bits does not apply to --method e8p"),
    (("--method", "e8p", "--sigmas", 12.0), "--sigmas does not apply to --method e8p"),
    (("--method", "e8p", "--embed-sigmas", 12.0), "--embed-sigmas does not apply to --method e8p"),
    (("--method", "fp16", "--embed-bits", 8), "--embed-bits does not apply to --method fp16"),
    # recipe path, from a recipe file
    (("--recipe", "RECIPE", "--bits", 4), "--bits does not apply with --recipe"),
    (("--recipe", "RECIPE", "--method", "gptq"), "--method does not apply with --recipe"),
    (("--recipe", "RECIPE", "--embed-sigmas", 9.0), "--embed-sigmas does not apply with --recipe"),
    (("--recipe", "RECIPE", "--embed-bits", 8), "--embed-bits does not apply with --recipe"),
    (("--recipe", "RECIPE", "--clip", "mse"), "--clip does not apply with --recipe"),
    (("--recipe", "RECIPE", "--sigmas", 9.0), "--sigmas does not apply with --recipe"),
    (("--recipe", "RECIPE", "--save-recipe", "r2.toml"), "--save-recipe applies only with --budget"),
    (("--recipe", "RECIPE", "--min-numel", 10), "--min-numel does not apply with --recipe"),
    (("--recipe", "RECIPE", "--fp16-passthrough"), "--fp16-passthrough does not apply with --recipe"),
    # bit-width budget path
    (("--budget", 10**6, "--bits", 4), "--bits does not apply with --budget"),
    (("--budget", 10**6, "--embed-bits", 8), "--embed-bits does not apply with --budget"),
    (("--budget", 10**6, "--sigmas", 12.0), "--sigmas does not apply with --budget"),
    (("--budget", 10**6, "--embed-sigmas", 12.0), "--embed-sigmas does not apply with --budget"),
    (("--budget", 10**6, "--recipe", "RECIPE"), "--recipe does not apply with --budget"),
    (("--budget", 10**6, "--lqer-top-k", 3), "--lqer-top-k does not apply with --budget"),
    (("--budget", 10**6, "--lqer-rank", 2), "--lqer-rank does not apply with --budget"),
    (("--budget", 10**6, "--lqer-bits", 3), "--lqer-bits does not apply with --budget"),
    (("--budget", 10**6, "--lqer-group", 32), "--lqer-group does not apply with --budget"),
    (("--budget", 10**6, "--lqer-weighted", "diag"), "--lqer-weighted does not apply with --budget"),
    (("--budget", 10**6, "--row-bits", "10%:8,rest:6"), "--row-bits does not apply with --budget"),
    (("--budget", 10**6, "--tokens", "TOKENS"), "--tokens does not apply with --budget"),
    (("--budget", 10**6, "--lam", 0.1), "--lam applies only to"),
    (("--budget", 10**6, "--method", "e8p"), "no bit widths to choose"),
    (("--budget", 10**6, "--method", "gptq"), "needs Hessians"),
    (("--budget", 0), "--budget must be a positive number of bytes"),
    (("--budget", 10**6, "--codec", "gzip"), "unknown codec"),
    (("--budget", 10**6, "--sensitivity", "missing.json"), "sensitivity file not found"),
]


@pytest.mark.parametrize("args, text", REFUSED, ids=[" ".join(map(str, a)) for a, _ in REFUSED])
def test_options_that_would_be_ignored_are_refused(tmp_path, ckpt_path, args, text):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[default]\nmethod = "rtn"\nbits = 5\n')
    subst = {"RECIPE": recipe, "TOKENS": str(tmp_path / "*.bin")}
    from pgolf_pack.calib.shards import write_shard

    write_shard(tmp_path / "t_000.bin", np.arange(200, dtype=np.uint16) % 64)
    art = tmp_path / "x.pgp"
    r = run("quantize", ckpt_path, "-o", art, *[subst.get(a, a) for a in args])
    one_line_error(r, text)
    assert not art.exists() and not list(tmp_path.glob("*.recipe.toml")) and not list(tmp_path.glob(".*tmp"))


def test_budget_takes_clip_and_refuses_an_output_that_overwrites_its_recipe(tmp_path, ckpt_path):
    out = tmp_path / "b.pgp"
    r = run("quantize", ckpt_path, "-o", out, "--budget", 40_000, "--clip", "absmax", "--codec", "zstd", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["total_bytes"] == out.stat().st_size <= 40_000
    assert {c["spec"]["clip"] for c in res["optimizer"]["choices"]} == {"absmax"}
    assert "clip = \"absmax\"" in (tmp_path / "b.pgp.recipe.toml").read_text()
    # The recipe path is checked before the minutes of optimizing, not after the artifact is written.
    one_line_error(run("quantize", ckpt_path, "-o", tmp_path / "c.pgp", "--budget", 40_000, "--save-recipe", ckpt_path),
                   "refusing to overwrite")
    one_line_error(run("quantize", ckpt_path, "-o", tmp_path / "c.pgp", "--budget", 40_000, "--save-recipe",
                       tmp_path / "c.pgp"), "refusing to overwrite")
    assert not (tmp_path / "c.pgp").exists()


def test_missing_output_directory_is_refused_before_work(tmp_path, ckpt_path):
    for extra in ((), ("--budget", 40_000), ("--method", "ecsq", "--lam", 0.1)):
        one_line_error(run("quantize", ckpt_path, "-o", tmp_path / "no" / "x.pgp", *extra), "output directory does not exist")


def test_row_tiers_take_embedding_widths_and_recipe_rules(tmp_path, ckpt_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[default]\nmethod = "rtn"\nbits = 5\n')
    for extra in (("--embed-sigmas", 9.0), ("--recipe", recipe)):
        out = tmp_path / "t.pgp"
        r = run("quantize", ckpt_path, "-o", out, "--row-bits", "10%:8,rest:4", "--codec", "zstd", *extra, "--json")
        assert r.exit_code == 0, r.output
        emb = next(t for t in json.loads(r.output)["tensors"] if t["name"] == "tok_emb.weight")
        assert emb["scheme"] == "rtn rows 10%:8,rest:4"
        stored = json.loads(run("inspect", out, "--json").output)["tensors"]
        tiers = next(t for t in stored if t["name"] == "tok_emb.weight")["params"]["tiers"]
        if extra[0] == "--embed-sigmas":
            assert [p["sigmas"] for p in tiers] == [9.0, 9.0]  # the fixed width reaches every tier
