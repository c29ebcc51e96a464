"""`pgolf-pack quantize --method ecsq|rdoq|trellis` (λ allocation, fixed or fitted to a budget) and
the rate–distortion methods in recipes, on small generated checkpoints.

Run: python -m pytest -q tests/test_cli_rd_quantize.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import save_file

from conftest import cli as run
from conftest import make_state_dict, one_line_error
from pgolf_pack.calib.hessian import save_hessians
from pgolf_pack.errors import PgolfError
from pgolf_pack.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """One layer, d=64: a λ probe packs in well under a second with zstd."""
    d = tmp_path_factory.mktemp("rd")
    sd = make_state_dict(seed=3, layers=1, dim=64, vocab=256)
    rng = np.random.default_rng(0)
    hs = {}
    for name, t in sd.items():
        if t.dim() == 2 and t.numel() >= 4096:
            # Columns of very different scale, as real activations have: the allocation must react.
            x = rng.standard_normal((3 * t.shape[1], t.shape[1])) * np.exp(rng.normal(0, 1.0, t.shape[1]))
            hs[name] = (x.T @ x).astype(np.float32)
    ckpt, hpath = d / "m.safetensors", d / "H.safetensors"
    save_file(sd, str(ckpt))
    save_hessians(hpath, hs)
    return ckpt, hpath


def test_budget_is_never_exceeded_and_artifact_verifies(tmp_path, model):
    ckpt, hpath = model
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps({"blocks.*.mlp.*": 4.0, "tok_emb.weight": 0.5}))
    art, budget = tmp_path / "a.pgp", 20_000
    r = run("quantize", ckpt, "-o", art, "--method", "ecsq", "--hessians", hpath, "--sensitivity", sens,
            "--budget", budget, "--codec", "zstd", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["artifact"] == str(art) and out["method"] == "ecsq" and out["budget"] == budget
    assert out["bytes"] == out["total_bytes"] == art.stat().st_size <= budget
    # The pick is the largest artifact among the probes that fit, and one of them.
    assert len(out["history"]) > 1
    assert out["bytes"] == max(p["bytes"] for p in out["history"] if p["bytes"] <= budget)
    assert any(p["lambda"] == out["lambda"] and p["bytes"] == out["bytes"] for p in out["history"])
    assert sum(t["bytes"] for t in out["tensors"]) + out["header_bytes"] == out["total_bytes"]

    v = run("verify-roundtrip", art, "--against", ckpt, "--json")
    assert v.exit_code == 0, v.output
    assert json.loads(v.output)["ok"]

    # The λ it reports reproduces the artifact without the search.
    again = tmp_path / "again.pgp"
    r = run("quantize", ckpt, "-o", again, "--method", "ecsq", "--hessians", hpath, "--sensitivity", sens,
            "--lam", repr(out["lambda"]), "--codec", "zstd", "--json")
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == art.read_bytes()


def test_fixed_lambda_prints_the_table(tmp_path, model):
    ckpt, hpath = model
    art = tmp_path / "t.pgp"
    r = run("quantize", ckpt, "-o", art, "--method", "trellis", "--hessians", hpath, "--lam", 0.3)
    assert r.exit_code == 0, r.output
    assert "trellis" in r.output and "blocks.0.mlp.fc.weight" in r.output and "(header + manifest)" in r.output
    assert run("verify-roundtrip", art).exit_code == 0
    # Larger λ = fewer bits.
    sizes = []
    for lam in (0.05, 1.0):
        p = tmp_path / f"r{lam}.pgp"
        r = run("quantize", ckpt, "-o", p, "--method", "rdoq", "--hessians", hpath, "--lam", lam, "--codec", "zstd", "--json")
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        sizes.append(out["bytes"])
        quantized = [t for t in out["tensors"] if t["scheme"].startswith("ecsq")]
        assert quantized and all(t["scheme"] == "ecsq+rdoq" for t in quantized)
    assert sizes[0] > sizes[1]


def test_impossible_budget_fails_cleanly(tmp_path, model):
    ckpt, hpath = model
    art = tmp_path / "x.pgp"
    r = run("quantize", ckpt, "-o", art, "--method", "ecsq", "--hessians", hpath, "--budget", 2000, "--codec", "zstd")
    one_line_error(r, "cannot be met")
    assert not art.exists()
    assert not list(tmp_path.iterdir())  # no temp file either


@pytest.mark.parametrize("args, text", [
    ((), "needs --budget BYTES"),
    (("--budget", 20_000, "--lam", 0.1), "not both"),
    (("--lam", 0), "--lam must be a positive number"),
    (("--budget", 0), "--budget must be a positive number of bytes"),
    (("--lam", 0.1, "--recipe", "r.toml"), "--recipe does not apply"),
    (("--lam", 0.1, "--embed-bits", 8), "--embed-bits does not apply"),
    (("--lam", 0.1, "--bits", 4), "--bits does not apply to --method ecsq"),
    (("--lam", 0.1, "--clip", "mse"), "--clip does not apply to --method ecsq"),
    (("--lam", 0.1, "--sigmas", 12.0), "--sigmas does not apply"),
    (("--lam", 0.1, "--embed-sigmas", 12.0), "--embed-sigmas does not apply"),
    (("--lam", 0.1, "--lqer-top-k", 2), "--lqer-top-k does not apply"),
    (("--lam", 0.1, "--lqer-rank", 2), "--lqer-rank does not apply"),
    (("--lam", 0.1, "--lqer-bits", 3), "--lqer-bits does not apply"),
    (("--lam", 0.1, "--lqer-group", 32), "--lqer-group does not apply"),
    (("--lam", 0.1, "--lqer-weighted", "chol"), "--lqer-weighted does not apply"),
    (("--lam", 0.1, "--row-bits", "10%:8,rest:6"), "--row-bits does not apply"),
    (("--lam", 0.1, "--tokens", "t_*.bin"), "--tokens does not apply"),
    (("--budget", 20_000, "--save-recipe", "r.toml"), "--save-recipe does not apply"),
    (("--lam", 0.1, "--group-by", "layer"), "unknown grouping"),
    (("--lam", 0.1, "--codec", "nope"), "unknown codec"),
    (("--lam", 0.1, "--sensitivity", "missing.json"), "sensitivity file not found"),
])
def test_rd_option_errors(tmp_path, model, args, text):
    ckpt, _ = model
    art = tmp_path / "x.pgp"
    r = run("quantize", ckpt, "-o", art, "--method", "ecsq", *args)
    one_line_error(r, text)
    assert not art.exists() and not list(tmp_path.iterdir())


def test_rd_only_options_are_refused_elsewhere(tmp_path, model):
    ckpt, _ = model
    one_line_error(run("quantize", ckpt, "-o", tmp_path / "x.pgp", "--lam", 0.1), "--lam applies only to")
    one_line_error(run("quantize", ckpt, "-o", tmp_path / "x.pgp", "--method", "gptq", "--sensitivity", "s.json"),
                   "--sensitivity applies only to")


def test_budget_optimizer_takes_sensitivity(tmp_path, model):
    ckpt, hpath = model
    sens = tmp_path / "s.json"
    sens.write_text(json.dumps({"blocks.*": 1.0, "tok_emb.weight": 1e-9}))

    def plan(*extra):
        r = run("quantize", ckpt, "-o", tmp_path / "b.pgp", "--method", "gptq", "--hessians", hpath, "--budget", 30000,
                "--codec", "zstd", "--json", *extra)
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        assert out["total_bytes"] <= 30000
        return {c["name"]: c["spec"]["bits"] for c in out["optimizer"]["choices"]}

    plain, weighted = plan(), plan("--sensitivity", sens)
    # Told the embedding's error costs (almost) no loss, the plan moves its bits to the blocks.
    assert weighted["tok_emb.weight"] < plain["tok_emb.weight"]
    assert sum(weighted.values()) - weighted["tok_emb.weight"] > sum(plain.values()) - plain["tok_emb.weight"]


def test_refuses_to_overwrite_the_input(model):
    ckpt, hpath = model
    before = ckpt.read_bytes()
    one_line_error(run("quantize", ckpt, "-o", ckpt, "--method", "ecsq", "--lam", 0.1), "refusing to overwrite")
    one_line_error(run("quantize", ckpt, "-o", hpath, "--method", "ecsq", "--hessians", hpath, "--lam", 0.1),
                   "refusing to overwrite")
    assert ckpt.read_bytes() == before


def test_bad_sensitivity_file(tmp_path, model):
    ckpt, _ = model
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"tok_emb.weight": -1}))
    one_line_error(run("quantize", ckpt, "-o", tmp_path / "x.pgp", "--method", "ecsq", "--lam", 0.1,
                       "--sensitivity", bad), "positive number")


def test_recipe_with_rd_methods(tmp_path, model):
    ckpt, hpath = model
    rec = tmp_path / "r.toml"
    rec.write_text('[default]\nmethod = "ecsq"\ndelta = 0.5\nrow_mode = "flat"\ncol_beta = 1.0\nrdoq = 1.0\n'
                   'iters = 1\nrate_model = "col"\n'
                   '[[rule]]\nmatch = "blocks.*.mlp.fc.weight"\nmethod = "trellis"\ncoding = "plain"\n')
    art = tmp_path / "rec.pgp"
    r = run("quantize", ckpt, "-o", art, "--recipe", rec, "--hessians", hpath, "--codec", "zstd", "--json")
    assert r.exit_code == 0, r.output
    schemes = {t["name"]: t["scheme"] for t in json.loads(r.output)["tensors"]}
    assert schemes["blocks.0.mlp.fc.weight"] == "trellis" and schemes["blocks.0.attn.c_q.weight"] == "ecsq+rdoq"
    assert run("verify-roundtrip", art, "--against", ckpt).exit_code == 0


def test_recipe_keys():
    recipe_from_dict({"default": {"method": "trellis", "delta": 0.4, "iters": 2, "coding": "split"},
                      "rule": [{"match": "x", "method": "e8p", "fallback": 2, "fallback_bits": 5}]})
    with pytest.raises(PgolfError, match="unknown method 'rdoq'"):
        recipe_from_dict({"default": {"method": "rdoq"}})
