"""`quantize(device=...)` / `quantize --device`: the sweeps run where asked, CPU results keep their
bits, and a device that cannot be used is refused in one line before any work.

CI has no GPU: every test here runs on the CPU except the last, which compares a CUDA run with a
CPU run and is skipped where CUDA is missing.

Run: python -m pytest -q tests/test_device.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import cli as run
from conftest import hessians_for, make_state_dict, one_line_error
from pgolf_pack.api import RDConfig, RDPlan, RecipePlan, quantize, quantize_file
from pgolf_pack.calib.hessian import save_hessians
from pgolf_pack.device import check_device
from pgolf_pack.errors import PgolfError
from pgolf_pack.quant.ecsq import make_grid, quantize_ecsq
from pgolf_pack.quant.gptq import gptq_quantize, prepare_hessian
from pgolf_pack.quant.rdoq import natural_lambda, quantize_ecsq_rdoq
from pgolf_pack.quant.trellis import quantize_trellis
from pgolf_pack.recipe import recipe_from_dict

NO_CUDA = not torch.cuda.is_available()
GPTQ_RECIPE = recipe_from_dict({"default": {"method": "gptq", "bits": 5, "sigmas": 3.0}})
ECSQ_RECIPE = recipe_from_dict({"default": {"method": "ecsq", "delta": 0.4, "rdoq": 0.5}})


@pytest.fixture(scope="module")
def small():
    """One layer at d=64: every quantize below takes a fraction of a second."""
    sd = make_state_dict(seed=5, layers=1, dim=64, vocab=128)
    return sd, hessians_for(sd, seed=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory, small):
    d = tmp_path_factory.mktemp("dev")
    sd, hs = small
    ckpt, hpath = d / "m.safetensors", d / "H.safetensors"
    save_file(sd, str(ckpt))
    save_hessians(hpath, hs)
    return ckpt, hpath


def _matrix(rng, rows=24, cols=40):
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    x = rng.standard_normal((3 * cols, cols)) * np.exp(rng.normal(0, 1.0, cols))
    return w, (x.T @ x).astype(np.float32)


def _same_tensor(a, b):
    assert a.scheme == b.scheme and a.params == b.params and list(a.streams) == list(b.streams)
    for k in a.streams:
        np.testing.assert_array_equal(a.streams[k].data, b.streams[k].data)


# --- the quantizers ---------------------------------------------------------------------------------


def test_explicit_cpu_device_gives_the_same_codes_in_every_quantizer(rng):
    w, h = _matrix(rng)
    prep = prepare_hessian(h)
    assert prep.device.type == "cpu" and prepare_hessian(h, device="cpu").device.type == "cpu"
    lam = natural_lambda(make_grid(w, 0.4, prep, "flat", 1.0), prep)
    runs = [
        lambda **kw: gptq_quantize("w", w, "float32", h, 5, sigmas=3.0, **kw),
        lambda **kw: quantize_ecsq("w", w, "float32", 0.4, h, row_mode="flat", col_beta=1.0, **kw),
        lambda **kw: quantize_ecsq("w", w, "float32", 0.4, None, **kw),  # no Hessian: no sweep, same device rule
        lambda **kw: quantize_ecsq_rdoq("w", w, "float32", 0.4, lam, h, row_mode="flat", col_beta=1.0, **kw),
        lambda **kw: quantize_trellis("w", w, "float32", 0.4, lam, h, "flat", 1.0, **kw),
    ]
    for fn in runs:
        _same_tensor(fn(), fn(device="cpu"))
        _same_tensor(fn(), fn(device=torch.device("cpu")))


# --- the API -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", [RDPlan(lam=2e-4, config=RDConfig(method="rdoq")),
                                  RDPlan(lam=2e-4, config=RDConfig(method="trellis"), codec="zstd"),
                                  RecipePlan(recipe=GPTQ_RECIPE, codec="zstd"),
                                  RecipePlan(recipe=ECSQ_RECIPE, codec="zstd")],
                         ids=["rdoq", "trellis", "gptq-recipe", "ecsq-recipe"])
def test_api_device_cpu_gives_the_same_bytes(small, plan):
    sd, hs = small
    assert quantize(sd, plan, hessians=hs, device="cpu").blob == quantize(sd, plan, hessians=hs).blob


@pytest.mark.parametrize("device,text", [("tpu", "--device must be cpu or cuda[:N], got 'tpu'"),
                                         ("cuda:x", "--device must be cpu or cuda[:N]"),
                                         ("cudax", "--device must be cpu or cuda[:N]")])
def test_misspelled_device_is_refused(small, device, text):
    sd, hs = small
    with pytest.raises(PgolfError, match=text.replace("[", r"\[").replace("]", r"\]")):
        quantize(sd, RDPlan(lam=2e-4), hessians=hs, device=device)
    with pytest.raises(PgolfError):
        check_device(device)


def test_a_gpu_for_a_numpy_only_plan_is_refused_on_any_machine(small):
    sd, _ = small
    with pytest.raises(PgolfError, match="--device cuda does not apply: method rtn runs in numpy on the CPU"):
        quantize(sd, RecipePlan(), device="cuda")
    mixed = recipe_from_dict({"default": {"method": "rtn"}, "rule": [{"match": "tok_emb.weight", "method": "e8p"}]})
    with pytest.raises(PgolfError, match="methods rtn, e8p run in numpy"):
        quantize(sd, RecipePlan(recipe=mixed), device="cuda:0")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_missing_cuda_is_refused_before_any_work(tmp_path, files):
    ckpt, hpath = files
    out = tmp_path / "a.pgp"
    with pytest.raises(PgolfError, match="--device cuda requested but no CUDA device is available"):
        quantize_file(ckpt, out, RDPlan(lam=2e-4), hessians=hpath, device="cuda")
    with pytest.raises(PgolfError, match="no CUDA device is available"):
        quantize_file(ckpt, out, RecipePlan(recipe=GPTQ_RECIPE), hessians=hpath, device="cuda:1")
    assert list(tmp_path.iterdir()) == []


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_device_cpu_gives_the_same_artifact(tmp_path, files):
    ckpt, hpath = files
    a, b = tmp_path / "a.pgp", tmp_path / "b.pgp"
    for out, extra in ((a, []), (b, ["--device", "cpu"])):
        r = run("quantize", ckpt, "-o", out, "--method", "ecsq", "--lam", 2e-4, "--hessians", hpath, "--json", *extra)
        assert r.exit_code == 0, r.output
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("args,text", [
    (["--method", "ecsq", "--lam", 2e-4, "--device", "tpu"], "--device must be cpu or cuda[:N], got 'tpu'"),
    (["--method", "rtn", "--device", "cuda"], "--device cuda does not apply: method rtn runs in numpy"),
    (["--method", "rtn", "--budget", 60000, "--device", "cuda"], "--device cuda does not apply: method rtn"),
    (["--method", "e8p", "--device", "cuda:0"], "--device cuda:0 does not apply: method e8p"),
])
def test_cli_refuses_an_unusable_device_in_one_line(tmp_path, files, args, text):
    ckpt, hpath = files
    out = tmp_path / "a.pgp"
    one_line_error(run("quantize", ckpt, "-o", out, *args), text)
    assert not out.exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("args", [["--method", "ecsq", "--lam", 2e-4], ["--method", "gptq"]])
def test_cli_refuses_cuda_without_a_gpu(tmp_path, files, args):
    ckpt, hpath = files
    out = tmp_path / "a.pgp"
    one_line_error(run("quantize", ckpt, "-o", out, "--hessians", hpath, *args, "--device", "cuda"),
                   "no CUDA device is available")
    assert list(tmp_path.iterdir()) == []


# --- on a GPU ----------------------------------------------------------------------------------------


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cuda_sweep_matches_the_cpu_up_to_last_bit_rounding(small):
    """float32 matmuls on the GPU may round differently in the last bits, so a code at a rounding
    boundary may move; nearly all codes must agree, the error must be as small, and the artifact
    must decode to what was quantized."""
    from pgolf_pack.pack.packer import unpack_model

    sd, hs = small
    for plan in (RDPlan(lam=2e-4, config=RDConfig(method="rdoq")), RecipePlan(recipe=GPTQ_RECIPE, codec="zstd")):
        cpu, gpu = quantize(sd, plan, hessians=hs), quantize(sd, plan, hessians=hs, device="cuda")
        qm, _ = unpack_model(gpu.blob)
        for a, b, g in zip(cpu.qm.tensors, qm.tensors, gpu.qm.tensors):
            for k in a.streams:
                np.testing.assert_array_equal(b.streams[k].data, g.streams[k].data)
                x, y = a.streams[k].data, b.streams[k].data
                assert x.shape == y.shape
                if x.dtype.kind in "iu":
                    assert (x != y).mean() < 0.01, (a.name, k)
        for rc, rg in zip(cpu.report.rows, gpu.report.rows):
            assert rg.rel_error == pytest.approx(rc.rel_error, rel=0.02, abs=1e-6), rc.name
