"""Drive the real CLI commands (typer's CliRunner) on small generated checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pgolf_pack.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


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


def one_line_error(r, text):
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert text in lines[0], lines[0]


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
