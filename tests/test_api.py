"""The quantize API (pgolf_pack.api): three plans, one checked entry point, the README's snippets.

Run: python -m pytest -q tests/test_api.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

import pgolf_pack
from conftest import EXAMPLES, cli_ok, make_state_dict
from pgolf_pack.api import BitBudgetPlan, Progress, RDPlan, RecipePlan, quantize, quantize_file
from pgolf_pack.checkpoint import load_checkpoint
from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import unpack_model
from pgolf_pack.pipeline import LqerOptions
from pgolf_pack.quant.allocate import RDConfig
from pgolf_pack.recipe import simple_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    sd = make_state_dict(seed=5, layers=1, dim=64, vocab=256)
    rng = np.random.default_rng(0)
    hs = {}
    for name, t in sd.items():
        if t.dim() == 2 and t.numel() >= 4096:
            x = rng.standard_normal((3 * t.shape[1], t.shape[1]))
            hs[name] = (x.T @ x).astype(np.float32)
    ckpt = d / "m.safetensors"
    save_file(sd, str(ckpt))
    # As read back: a file's tensor order is its own, and the artifact keeps it.
    return load_checkpoint(ckpt), hs, ckpt


PLANS = {
    "recipe": lambda: RecipePlan(recipe=simple_recipe("gptq", 5), lqer=LqerOptions(top_k=1), codec="zstd"),
    "bit-budget": lambda: BitBudgetPlan(budget=30_000, candidates=({"method": "rtn", "bits": 3}, {"method": "rtn", "bits": 6}),
                                        codec="zstd"),
    "rd-lam": lambda: RDPlan(lam=0.05, codec="zstd"),
    "rd-budget": lambda: RDPlan(budget=25_000, sensitivity={"blocks.*": 2.0}, config=RDConfig(method="rdoq"), codec="zstd"),
}


@pytest.mark.parametrize("kind", list(PLANS))
def test_in_memory_and_file_give_the_same_bytes(tmp_path, model, kind):
    sd, hs, ckpt = model
    events: list[Progress] = []
    mem = quantize(sd, PLANS[kind](), hessians=hs, progress=events.append)
    out = tmp_path / "a.pgp"
    res = quantize_file(ckpt, out, PLANS[kind](), hessians=hs)
    assert out.read_bytes() == res.blob == mem.blob
    assert mem.artifact is None and res.artifact == out
    assert res.report.total_bytes == res.bytes == sum(r.bytes for r in res.report.rows) + res.report.header_bytes
    d = res.to_dict()
    assert d["artifact"] == str(out) and d["total_bytes"] == res.bytes and "artifact" not in mem.to_dict()
    # Every stage is announced before its steps, and its steps count up.
    assert events and events[0].done == 0
    for a, b in zip(events, events[1:]):
        assert b.done == (a.done + 1 if b.stage == a.stage else 0)
    back, _ = unpack_model(res.blob)
    assert [t.name for t in back.tensors] == list(sd)
    if kind == "bit-budget":
        assert res.bytes <= 30_000 and res.recipe_path == tmp_path / "a.pgp.recipe.toml" and d["recipe"] == str(res.recipe_path)
        again = quantize_file(ckpt, tmp_path / "b.pgp", RecipePlan(recipe=res.recipe_path, codec="zstd"))
        assert again.blob == res.blob  # the saved recipe reproduces the plan
    if kind == "rd-budget":
        assert res.bytes <= 25_000 and res.lam == d["lambda"] and len(d["history"]) == len(res.history) > 1
        fixed = quantize(sd, RDPlan(lam=res.lam, sensitivity={"blocks.*": 2.0}, config=RDConfig(method="rdoq"),
                                    codec="zstd"), hessians=hs)
        assert fixed.blob == res.blob  # the λ found reproduces the artifact without the search


@pytest.mark.parametrize("plan, text", [
    (RDPlan(), "needs --budget BYTES"),
    (RDPlan(budget=1000, lam=0.1), "not both"),
    (RDPlan(lam=float("nan")), "--lam must be a positive number"),
    (RDPlan(budget=-5), "--budget must be a positive number of bytes"),
    (BitBudgetPlan(budget=0), "--budget must be a positive number of bytes"),
    (BitBudgetPlan(budget=10**6, candidates=()), "no candidate"),
    (BitBudgetPlan(budget=10**6, candidates=({"method": "gptq", "bits": 4},)), "needs Hessians"),
    (BitBudgetPlan(budget=10**6, candidates=({"bits": 12},)), "bits must be an integer in 2..8"),
    (RecipePlan(codec="gzip"), "unknown codec"),
    (RecipePlan(grouping="layer"), "unknown grouping"),
    (RecipePlan(token_freq=np.ones(256)), "nothing asks for row_bits"),
    (RecipePlan(lqer=LqerOptions(top_k=2, weighted="chol")), "needs Hessians"),
    (RecipePlan(recipe="missing.toml"), "recipe file not found"),
    (RDPlan(lam=0.1, sensitivity="missing.json"), "sensitivity file not found"),
    ("rtn", "not a quantize plan"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_plans_are_refused_before_any_work(tmp_path, plan, text):
    # The checkpoint does not exist: a plan error must come first, before anything is read.
    with pytest.raises(PgolfError, match=re.escape(text)):
        quantize_file(tmp_path / "missing.safetensors", tmp_path / "x.pgp", plan)
    assert not list(tmp_path.iterdir())


def test_outputs_never_overwrite_inputs(tmp_path, model):
    sd, hs, ckpt = model
    sens = tmp_path / "s.json"
    sens.write_text(json.dumps({"blocks.*": 2.0}))
    for out, plan in [(ckpt, RDPlan(lam=0.1)), (sens, RDPlan(lam=0.1, sensitivity=sens)),
                      (tmp_path / "a.pgp", BitBudgetPlan(budget=10**6, recipe_out=ckpt)),
                      (tmp_path / "a.pgp", BitBudgetPlan(budget=10**6, recipe_out=tmp_path / "a.pgp"))]:
        with pytest.raises(PgolfError, match="refusing to overwrite"):
            quantize_file(ckpt, out, plan)
    with pytest.raises(PgolfError, match="output directory does not exist"):
        quantize_file(ckpt, tmp_path / "no" / "a.pgp", RecipePlan())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_unmatched_sensitivity_entries_are_warned(model):
    sd, hs, _ = model
    seen: list[str] = []
    res = quantize(sd, RDPlan(lam=0.05, sensitivity={"blocks.9.*": 2.0}, codec="zstd"), warn=seen.append)
    assert seen == res.warnings == ["sensitivity entry 'blocks.9.*' matches no quantized tensor"]


def test_the_api_is_importable_from_the_package_root():
    assert pgolf_pack.quantize_file is quantize_file and pgolf_pack.RDPlan is RDPlan
    with pytest.raises(AttributeError):
        pgolf_pack.no_such_name  # noqa: B018


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_python_api_runs(tmp_path, monkeypatch):
    blocks = python_blocks("Python API")
    assert len(blocks) >= 2 and "RDPlan" in blocks[0] and "sensitivity" in blocks[0]
    # The snippets run from the repository root, after `calibrate` and `sensitivity` wrote H and S.
    (tmp_path / "examples").symlink_to(EXAMPLES)
    cli_ok("calibrate", EXAMPLES / "tiny_gpt.safetensors", "--tokens", str(EXAMPLES / "tiny_train_*.bin"),
           "-o", tmp_path / "H.safetensors", "--seqs", 2, "--seq-len", 128)
    (tmp_path / "S.json").write_text(json.dumps({"blocks.*.mlp.proj.weight": 0.05, "tok_emb.weight": 2.0}))
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
    assert (tmp_path / "tiny_ecsq.pgp").is_file()
