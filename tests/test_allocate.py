"""Equal-slope allocation (the byte predictor and the λ search: tests/test_rd_search.py).

Run: python -m pytest -q tests/test_allocate.py
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import hessians_for, lam_at, make_state_dict
from pgolf_pack.errors import PgolfError
from pgolf_pack.pack.packer import pack_model
from pgolf_pack.quant.allocate import (
    SLOPE,
    RDConfig,
    allocate_steps,
    prepare_model,
    proxy_error,
    quantize_model_rd,
    step_for,
)


@pytest.fixture(scope="module")
def small():
    sd = make_state_dict(seed=3, layers=1, dim=64, vocab=256)
    return sd, hessians_for(sd)


def test_steps_have_equal_slope(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="ecsq"), sensitivity={"blocks.*.mlp.*": 4.0, "tok_emb.weight": 2.0})
    assert {t.name: t.sens for t in mp.tensors}["tok_emb.weight"] == 2.0
    assert mp.info("blocks.0.mlp.fc.weight").sens == 4.0 and mp.info("blocks.0.attn.c_q.weight").sens == 1.0
    for lam in (1e-4, 3e-2):
        for info in mp.tensors:
            d = step_for(info, lam)
            assert np.isclose(d * d * info.k * info.sens, SLOPE * lam)
    with pytest.raises(PgolfError):
        step_for(mp.tensors[0], 0.0)


def test_larger_lambda_means_fewer_bytes_and_more_error(small):
    sd, hs = small
    mp = prepare_model(sd, hs, RDConfig(method="rdoq"))
    sizes, errs = [], []
    for d in (0.2, 0.4, 0.8):
        qm = quantize_model_rd(mp, lam_at(mp, d))
        sizes.append(len(pack_model(qm, codec="entropy").blob))
        errs.append(sum(proxy_error(mp, qm).values()))
    assert sizes[0] > sizes[1] > sizes[2]
    assert errs[0] < errs[1] < errs[2]


def test_without_hessians_column_steps_are_off(small):
    sd, _ = small
    mp = prepare_model(sd, None, RDConfig(method="rdoq"))
    qm = quantize_model_rd(mp, lam_at(mp, 0.3))
    assert all("colexp" not in t.streams for t in qm.tensors)
    steps = allocate_steps(mp, 1e-4)
    assert set(steps) == {t.name for t in mp.tensors}


def test_missing_hessian_is_an_error(small):
    sd, hs = small
    partial = dict(list(hs.items())[1:])
    with pytest.raises(PgolfError, match="no entry"):
        prepare_model(sd, partial, RDConfig())


def test_analyze_rd_cli(tmp_path):
    """The real `analyze rd` command end to end on a tiny model, tokenizer and shard."""
    import json

    import sentencepiece as spm
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from pgolf_pack.calib.hessian import save_hessians
    from pgolf_pack.calib.shards import write_shard
    from pgolf_pack.cli import app

    text = ("Quantization maps weights to a few levels; entropy coding then spends bits where the levels "
            "are rare. A trellis lets two quantizers share the work. ") * 40
    (tmp_path / "c.txt").write_text(text.replace(". ", ".\n"), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"), model_type="bpe",
                                   vocab_size=320, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    vocab = sp.vocab_size()
    sd = make_state_dict(seed=5, layers=2, dim=64, vocab=vocab)
    save_file(sd, str(tmp_path / "m.safetensors"))
    hs = hessians_for(sd, 1)
    save_hessians(tmp_path / "h.safetensors", hs, {k: 192 for k in hs})
    write_shard(tmp_path / "val.bin", np.array([1] + sp.encode(text), dtype=np.int64)[: 4 * 32 + 1])
    res = CliRunner().invoke(app, ["analyze", "rd", str(tmp_path / "m.safetensors"), "--hessians", str(tmp_path / "h.safetensors"),
                                   "--tokens", str(tmp_path / "val.bin"), "--tokenizer", str(tmp_path / "sp.model"),
                                   "--pipelines", "record,gptq,ecsq,trellis", "--points", "2", "--widths", "0.9,1",
                                   "--seq-len", "32", "--max-seqs", "4", "--plot", str(tmp_path / "rd.png"), "--json",
                                   "--record-codec", "zstd"])  # lrzip costs minutes per call on a busy machine
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {p["pipeline"] for p in out["points"]} == {"record", "gptq", "ecsq", "trellis"}
    assert all(p["bytes"] > 0 and p["bpb"] > 0 and p["decode_s"] >= 0 for p in out["points"])
    assert out["fp_bpb"] > 0 and out["eval_tokens"] == 4 * 32
    assert "reference" in out["compare"] and (tmp_path / "rd.png").stat().st_size > 0
    bad = CliRunner().invoke(app, ["analyze", "rd", str(tmp_path / "m.safetensors"), "--hessians", str(tmp_path / "h.safetensors"),
                                   "--pipelines", "record,vq"])
    assert bad.exit_code == 1 and "unknown pipeline" in bad.output


def test_margin_wording_has_no_double_sign():
    from pgolf_pack.cli.rd import _more_or_less

    assert _more_or_less(44.444, ".2f", "fewer", "more", "%") == "44.44% fewer"
    assert _more_or_less(-1.5, ".2f", "fewer", "more", "%") == "1.50% more"
    assert _more_or_less(-0.00123, ".5f", "lower", "higher") == "0.00123 higher"
