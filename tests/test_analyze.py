"""analyze size / budget / rms and the byte-budget optimizer, on small generated models."""

import json
import struct
import tomllib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import pgolf_pack.cli.analyze  # noqa: F401  (registers the analyze commands)
from pgolf_pack.ship.minify import minify, unwrap, wrappers
from pgolf_pack.analyze.budget import (
    BudgetReport, code_cost, decoder_cost, margin_use,
)
from pgolf_pack.analyze.optimize import (
    Option, _hull, _toml_value, measure_candidates, optimize_plan, plan_for_budget, recipe_to_toml, save_recipe,
)
from pgolf_pack.analyze.rms import linear_fit, plot_rms, rms_analysis, rms_recipe
from pgolf_pack.analyze.size import attribute_stream_bytes, size_report, zeroth_order_entropy
from pgolf_pack.cli import app
from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import attribute_bytes, pack_model
from pgolf_pack.pipeline import quantize_tensors
from pgolf_pack.recipe import Recipe, load_recipe, recipe_from_dict, simple_recipe

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def packed(state_dict, bits=6, codec="zstd"):
    qm = quantize_tensors(state_dict, simple_recipe(bits=bits, embed_bits=8))
    res = pack_model(qm, codec=codec)
    return qm, res


# --- size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["entropy", "raw"])
def test_size_rows_sum_to_artifact_bytes_exactly(state_dict, split):
    qm, res = packed(state_dict)
    rep = size_report(res.blob, res.manifest, qm, state_dict, split=split)
    assert sum(r.bytes for r in rep.rows) + rep.header_bytes == len(res.blob) == rep.total_bytes
    per, head = attribute_bytes(res.blob, res.manifest)
    for r in rep.rows:
        assert r.symbol_bytes + r.side_bytes == r.bytes
        if split == "raw" or r.symbol_bytes == 0:
            assert r.bytes == per[r.name]
    assert head == rep.header_bytes
    # Within a symbol group, bytes follow each member's order-0 entropy.
    fcs = [r for r in rep.rows if r.name.endswith("mlp.fc.weight")]
    group = next(g["length"] for g in res.manifest["groups"] if g["name"].startswith("mlp.fc.weight:"))
    assert sum(r.symbol_bytes for r in fcs) == group
    if split == "entropy":
        h = [r.entropy_bpp * r.params for r in fcs]
        assert fcs[0].symbol_bytes == pytest.approx(group * h[0] / sum(h), abs=1)
    fc = next(r for r in rep.rows if r.name == "blocks.0.mlp.fc.weight")
    assert fc.symbol_bytes > 0 and fc.side_bytes > 0 and 0 < fc.entropy_bpp < 6
    ctrl = next(r for r in rep.rows if r.name == "blocks.0.attn_scale")
    assert ctrl.symbol_bytes == 0 and ctrl.side_bytes > 0 and ctrl.entropy_bpp is None
    assert abs(sum(r.share for r in rep.rows) + rep.header_bytes / len(res.blob) - 1) < 1e-9


def test_stream_attribution_covers_every_payload_byte(state_dict):
    _, res = packed(state_dict, codec="brotli")
    per, head = attribute_stream_bytes(res.blob, res.manifest)
    assert sum(sum(s.values()) for s in per.values()) + head == len(res.blob)
    assert set(per["tok_emb.weight"]) == {"q", "scale"}


def test_zeroth_order_entropy():
    assert zeroth_order_entropy(np.array([-1, 0, 1, 2] * 10)) == pytest.approx(2.0)
    assert zeroth_order_entropy(np.full(7, 3, np.int8)) == 0.0
    assert zeroth_order_entropy(np.array([0, 0, 0, 1])) == pytest.approx(0.8112781244591328)


def test_size_cli_checkpoint_and_artifact(tmp_path, ckpt_path, state_dict):
    r = run("analyze", "size", ckpt_path, "--codec", "zstd", "--bits", 5, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert sum(t["bytes"] for t in d["tensors"]) + d["header_bytes"] == d["total_bytes"]
    assert d["symbol_bytes"] + d["side_bytes"] + d["header_bytes"] == d["total_bytes"]

    _, res = packed(state_dict)
    art = tmp_path / "m.pgp"
    art.write_bytes(res.blob)
    csv_path = tmp_path / "size.csv"
    r = run("analyze", "size", art, "--sort", "name", "--csv", csv_path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["total_bytes"] == art.stat().st_size
    assert sum(t["bytes"] for t in d["tensors"]) + d["header_bytes"] == art.stat().st_size
    lines = csv_path.read_text().splitlines()
    assert lines[-1].split(",")[7] == str(art.stat().st_size)
    assert len(lines) == 1 + len(state_dict) + 2
    r = run("analyze", "size", art, "--top", 3)
    assert r.exit_code == 0 and "more tensors" in r.output and "header + manifest" in r.output
    r = run("analyze", "size", art, "--sort", "nonsense")
    assert r.exit_code == 1 and "unknown sort key" in r.output


# --- budget ----------------------------------------------------------------------------------------


SOURCE = '''"""Module docstring that costs bytes."""
import math


def area(r: float) -> float:
    """Circle area."""
    # a comment
    return math.pi * r * r


class Box:
    """Only a docstring."""
'''


SOURCE_TYPED = SOURCE + '''

from dataclasses import dataclass, fields


@dataclass
class Hyper:
    "Read back through its annotations, as typer and dataclasses do."
    lr: float = 0.1
    steps: int = 3
'''


def test_user_code_wrappers_run_and_decode():
    small = minify(SOURCE_TYPED, keep_annotations=True)
    assert len(small) < len(SOURCE_TYPED) and "docstring" not in small and "comment" not in small
    for method, w in wrappers(small).items():
        assert unwrap(w) == small, method
        ns: dict = {}
        exec(compile(w, "<wrapper>", "exec"), ns)
        assert ns["area"](2.0) == pytest.approx(4 * np.pi)
        assert isinstance(ns["Box"](), ns["Box"])
        # User code keeps its annotations: a program may read them.
        assert ns["area"].__annotations__ == {"r": float, "return": float}
        assert [(f.name, f.type) for f in ns["fields"](ns["Hyper"])] == [("lr", float), ("steps", int)]


@pytest.mark.parametrize("keep", [False, True])
def test_minify_keeps_emptied_blocks_valid(keep):
    # Dropping literals (and, for the decoder, bare annotations) can empty a body or a finally
    # clause; each must still compile and run the same.
    src = 'def f():\n    x: int\ntry:\n    y = 1\nfinally:\n    "only a literal"\nfor i in range(2):\n    y += i\nelse:\n    "z"\n'
    ns: dict = {}
    exec(compile(minify(src, keep_annotations=keep), "<m>", "exec"), ns)
    assert ns["f"]() is None and ns["y"] == 2


def test_minify_keeps_the_code_of_real_modules():
    import ast

    import pgolf_pack.analyze.optimize as mod

    text = open(mod.__file__).read()
    small = minify(text, keep_annotations=True)
    # Same program as the original minus its docstrings and other bare literals.
    strip = lambda t: [n for n in ast.walk(t) if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    got = ast.parse(small)
    assert sum(isinstance(n, ast.AnnAssign) for n in ast.walk(got)) == sum(isinstance(n, ast.AnnAssign) for n in ast.walk(ast.parse(text)))
    assert len([n for n in strip(got) if isinstance(n, ast.Call)]) == len([n for n in strip(ast.parse(text)) if isinstance(n, ast.Call)])
    assert len(small) < 0.8 * len(text)
    with pytest.raises(PgolfError, match="not valid Python"):
        minify("def f(:\n")


def test_code_cost_counts_the_smaller_form(tmp_path):
    big = tmp_path / "big.py"
    big.write_text(SOURCE * 30)
    c = code_cost(big)
    assert c.counted[0] == min(c.raw_bytes, c.lzma_bytes, c.brotli_bytes) < c.raw_bytes
    tiny = tmp_path / "t.py"
    tiny.write_text("x=1\n")
    assert code_cost(tiny).counted == (4, "raw")
    data = tmp_path / "vocab.bin"
    data.write_bytes(b"\x00" * 100)
    assert code_cost(data).counted == (100, "raw")


def test_budget_verdict_and_exit_code(tmp_path, state_dict):
    _, res = packed(state_dict)
    art = tmp_path / "m.pgp"
    art.write_bytes(res.blob)
    code = tmp_path / "decode.py"
    code.write_text(SOURCE * 20)
    counted = code_cost(code).counted[0]
    decoder = decoder_cost(res.blob).counted[0]
    cap = len(res.blob) + decoder + counted + 1234
    r = run("analyze", "budget", art, "--cap", cap, "--code", code, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["fits"] and d["margin"] == 1234 and d["verdict"] == "fits, margin 1,234 bytes"
    assert d["total_bytes"] == len(res.blob) + decoder + counted and d["decoder_bytes"] == decoder > 1000
    r = run("analyze", "budget", art, "--cap", cap, "--code", code)
    assert r.exit_code == 0 and "fits, margin 1,234 bytes" in r.output
    r = run("analyze", "budget", art, "--cap", cap - 2000, "--code", code)
    assert r.exit_code == 1 and "over by 766 bytes" in r.output
    r = run("analyze", "budget", art, "--code", tmp_path / "missing.py")
    assert r.exit_code == 1 and "code file not found" in r.output


def test_margin_use_prices_a_layer(state_dict):
    qm, res = packed(state_dict)
    rep = size_report(res.blob, res.manifest, qm)
    layer_rows = [r for r in rep.rows if r.name.startswith("blocks.")]
    u = margin_use(rep, 10 * len(res.blob))
    assert u.layers == 2
    assert u.layer_params == sum(r.params for r in layer_rows) / 2
    raw_layer = sum(r.bytes for r in layer_rows) / 2
    assert raw_layer < u.layer_bytes < raw_layer + rep.header_bytes
    assert u.extra_layers == int(10 * len(res.blob) // u.layer_bytes)
    b = BudgetReport(len(res.blob), [], cap=len(res.blob) - 100, use=margin_use(rep, -100))
    assert not b.fits and b.verdict == "over by 100 bytes"
    assert any("dropping one layer" in line for line in b.buys())


# --- rms -------------------------------------------------------------------------------------------


def test_linear_fit_known_relation(rng):
    x = rng.uniform(0.01, 0.2, 200)
    f = linear_fit(x, 0.3 + 2.5 * x)
    assert f.slope == pytest.approx(2.5) and f.intercept == pytest.approx(0.3) and f.r2 == pytest.approx(1.0)
    y = 0.3 + 2.5 * x + rng.normal(0, 0.05, x.size)
    f = linear_fit(x, y)
    slope, icpt = np.polyfit(x, y, 1)
    assert f.slope == pytest.approx(slope) and f.intercept == pytest.approx(icpt)
    assert f.r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert 0.5 < f.r2 < 1
    assert linear_fit(x, rng.normal(size=x.size)).r2 < 0.05


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_rms_analysis_and_plot(tmp_path, state_dict):
    rep = rms_analysis(state_dict, rms_recipe(6, "sdclip", 12.85), codec="zstd")
    assert len(rep.rows) == 9 and len(rep.outliers) == 3
    for r in rep.rows:
        w = state_dict[r.name].float().numpy()
        assert r.rms == pytest.approx(float(np.sqrt((w.astype(np.float64) ** 2).mean())))
        assert 0 < r.ratio < 1 and r.symbol_bytes == pytest.approx(r.ratio * w.size)
    assert 0 <= rep.fit_rms.r2 <= 1 and 0 <= rep.fit_log_rms.r2 <= 1
    png = tmp_path / "rms.png"
    plot_rms(rep, png, width_px=900, height_px=400, dpi=100)
    assert _png_size(png) == (900, 400)
    import matplotlib.image as mpimg

    assert mpimg.imread(str(png)).shape[:2] == (400, 900)


def test_rms_cli(tmp_path, ckpt_path):
    png = tmp_path / "r.png"
    r = run("analyze", "rms", ckpt_path, "--codec", "zstd", "--plot", png, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert set(d) >= {"fit_ratio_vs_rms", "fit_ratio_vs_log_rms", "tensors", "outliers"}
    assert d["plot"] == str(png) and _png_size(png) == (1200, 500)
    r = run("analyze", "rms", ckpt_path, "--codec", "zstd", "--search-clip")
    assert r.exit_code == 0 and "R² =" in r.output
    r = run("analyze", "rms", ckpt_path, "--clip", "bogus")
    assert r.exit_code == 1 and "unknown clip rule" in r.output


# --- optimizer -------------------------------------------------------------------------------------


def test_hull_drops_dominated_and_concave_points():
    opts = [Option(0, 100, 10.0), Option(1, 150, 9.9), Option(2, 200, 2.0), Option(3, 250, 3.0), Option(4, 400, 1.0)]
    assert [o.cand for o in _hull(opts)] == [0, 2, 4]


def test_optimizer_respects_budgets_and_recipe_reproduces(tmp_path, state_dict):
    _, ref = packed(state_dict, bits=8)
    m = measure_candidates(state_dict, measure_codec="zstd")
    errors = []
    for frac in (0.6, 0.7, 0.8):
        budget = int(frac * len(ref.blob))
        rec, det = plan_for_budget(m, budget, codec="zstd")
        assert det.actual_bytes == len(det.blob) <= budget
        assert det.actual_bytes in [t.actual_bytes for t in det.trials]
        errors.append(det.error)
        # The written recipe, read back and run through the normal pipeline, gives the same artifact.
        path = tmp_path / f"plan{frac}.toml"
        save_recipe(rec, path, comment=f"budget {budget}")
        blob = pack_model(quantize_tensors(state_dict, load_recipe(path)), codec="zstd").blob
        assert blob == det.blob
    assert errors[0] >= errors[1] >= errors[2]
    assert len({json.dumps(c.spec, sort_keys=True) for c in det.choices}) > 1  # a real mix, not one scheme


def test_optimizer_spends_bytes_where_the_hessian_says(rng):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g)
    tensors = {"a.weight": a, "b.weight": b}
    H = {"a.weight": np.eye(64, dtype=np.float32) * 1000.0, "b.weight": np.eye(64, dtype=np.float32)}
    base = Recipe(min_numel=1)
    cands = [{"method": "rtn", "bits": k, "clip": "sdclip", "sigmas": 4.0} for k in (3, 6)]
    _, lo = optimize_plan(tensors, 10**7, candidates=cands[:1], codec="zstd", base=base)
    _, hi = optimize_plan(tensors, 10**7, candidates=cands[1:], codec="zstd", base=base)
    one_up = (lo.actual_bytes + hi.actual_bytes) // 2 + 200  # room for one tensor at int6, not two
    _, det = optimize_plan(tensors, one_up, hessians=H, candidates=cands, codec="zstd", base=base)
    bits = {c.name: c.spec["bits"] for c in det.choices}
    assert bits == {"a.weight": 6, "b.weight": 3}
    assert det.actual_bytes <= one_up
    H2 = {"a.weight": H["b.weight"], "b.weight": H["a.weight"]}
    _, det2 = optimize_plan(tensors, one_up, hessians=H2, candidates=cands, codec="zstd", base=base)
    assert {c.name: c.spec["bits"] for c in det2.choices} == {"a.weight": 3, "b.weight": 6}
    # A measured sensitivity 10^4× larger on b outweighs a's 1000× larger Hessian (globs work).
    _, det3 = optimize_plan(tensors, one_up, hessians=H, candidates=cands, codec="zstd", base=base,
                            sensitivity={"b.*": 1e4, "a.weight": 1.0})
    assert {c.name: c.spec["bits"] for c in det3.choices} == {"a.weight": 3, "b.weight": 6}


def test_optimizer_impossible_budget_says_by_how_much(state_dict):
    with pytest.raises(PgolfError, match=r"cannot be met.* over"):
        optimize_plan(state_dict, 1000, codec="zstd", candidates=[{"bits": 2}, {"bits": 3}])


def test_optimizer_rejects_bad_input(state_dict):
    with pytest.raises(PgolfError, match="bits must be"):
        optimize_plan(state_dict, 10**6, candidates=[{"bits": 12}], codec="zstd")
    with pytest.raises(PgolfError, match="no candidate applies"):
        optimize_plan(state_dict, 10**6, candidates=[{"bits": 4, "match": "*mlp*"}], codec="zstd")


def test_recipe_toml_roundtrip(tmp_path):
    r = recipe_from_dict({"min_numel": 10, "passthrough": "fp16", "default": {"bits": 5, "sigmas": 12.85},
                          "rule": [{"match": "blocks.[0].mlp*", "bits": 4, "clip": "mse", "act_order": True,
                                    "damp": 1e-05, "group": 'we"ird\\name'}]})
    path = tmp_path / "r.toml"
    save_recipe(r, path, comment="line one\nline two")
    text = path.read_text()
    assert text.startswith("# line one\n# line two\n")
    assert load_recipe(path).to_dict() == r.to_dict()
    assert tomllib.loads(recipe_to_toml(r))["rule"][0]["damp"] == 1e-05


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.booleans(),
                 st.lists(st.integers(-5, 5), max_size=4)))
def test_toml_values_roundtrip(v):
    assert tomllib.loads(f"x = {_toml_value(v)}")["x"] == v
