import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from safetensors.torch import save_file
from typer.testing import CliRunner

# The bundled example: a small GPT really trained on English text, with its tokenizer and shards.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EX_CKPT = EXAMPLES / "tiny_gpt.safetensors"
EX_TRAIN = str(EXAMPLES / "tiny_train_*.bin")
EX_VAL = str(EXAMPLES / "tiny_val_*.bin")
EX_TOKENIZER = EXAMPLES / "tiny_sp512.model"
EX_RECIPE_1855 = EXAMPLES / "recipes" / "record_1855.toml"

_runner = CliRunner()

# CI (``.ci/run`` sets PGOLF_HYPOTHESIS_PROFILE=ci) draws the same examples on every run, so a
# property can only fail there the way it fails here; plain runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("PGOLF_HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["PGOLF_HYPOTHESIS_PROFILE"])


@pytest.fixture(scope="module")
def example_calibrated():
    """The bundled example built by the adapter, its Hessians from 4×256 train tokens, and the
    train tokens (the sensitivity tests cut their scoring windows from them)."""
    from pgolf_pack.calib import load_tokens
    from pgolf_pack.calib.adapter import build_model
    from pgolf_pack.calib.calibrate import calibration_batches, collect_hessians
    from pgolf_pack.checkpoint import load_checkpoint

    loaded = build_model(load_checkpoint(EX_CKPT))
    toks = load_tokens(EX_TRAIN)
    hs, counts = collect_hessians(loaded, calibration_batches(toks, 4, 256))
    return loaded, hs, counts, toks


def cli(*args):
    """Run ``pgolf-pack ARGS`` in-process; returns typer's Result (exit_code, output)."""
    from pgolf_pack.cli import app

    return _runner.invoke(app, [str(a) for a in args])


def cli_ok(*args):
    """Run a command that must succeed; its parsed JSON when ``--json`` is given, else its output."""
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output) if "--json" in args else r.output


def one_line_error(r, text=""):
    """A user error: exit code 1, exactly one ``error: ...`` line containing ``text``, no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert text in lines[0], lines[0]


def make_state_dict(seed: int = 0, layers: int = 2, dim: int = 64, vocab: int = 256) -> dict[str, torch.Tensor]:
    """A small state dict with Parameter Golf baseline names and heavy-ish tailed weights."""
    g = torch.Generator().manual_seed(seed)

    def mat(r, c, scale=0.05):
        # Student-t-like tails so clip choices matter.
        x = torch.randn(r, c, generator=g) * scale
        x[torch.rand(r, c, generator=g) < 0.01] *= 6
        return x

    sd = {"tok_emb.weight": mat(vocab, dim, 0.8).to(torch.bfloat16)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = mat(dim, dim)
        sd[p + "attn.c_k.weight"] = mat(dim // 2, dim)
        sd[p + "attn.c_v.weight"] = mat(dim // 2, dim)
        sd[p + "attn.proj.weight"] = mat(dim, dim)
        sd[p + "mlp.fc.weight"] = mat(2 * dim, dim)
        sd[p + "mlp.proj.weight"] = mat(dim, 2 * dim)
        sd[p + "attn_scale"] = torch.ones(dim)
        sd[p + "mlp_scale"] = torch.ones(dim)
        sd[p + "resid_mix"] = torch.stack([torch.ones(dim), torch.zeros(dim)])
        sd[p + "attn.q_gain"] = torch.full((4,), 1.5)
    sd["skip_weights"] = torch.ones(layers // 2 or 1, dim)
    return sd


@pytest.fixture
def state_dict():
    return make_state_dict()


@pytest.fixture
def ckpt_path(tmp_path, state_dict):
    p = tmp_path / "model.safetensors"
    save_file(state_dict, str(p))
    return p


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def hessians_for(sd, seed=0):
    """Random positive-definite Hessians with spread column scales for every quantizable matrix."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in sd.items():
        if t.dim() == 2 and t.numel() >= 4096:
            cols = t.shape[1]
            x = rng.standard_normal((3 * cols, cols)) * np.exp(rng.normal(0, 1.0, cols))
            out[name] = (x.T @ x).astype(np.float32)
    return out


def lam_at(mp, delta):
    """The λ that gives the median matrix a step of ``delta`` (its spread's multiple)."""
    from pgolf_pack.quant.allocate import SLOPE

    return delta * delta * float(np.median([t.k * t.sens for t in mp.tensors])) / SLOPE
