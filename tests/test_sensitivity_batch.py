"""The direct sensitivity measurement scores several sequences per model call: the multipliers
stay those of one call per sequence (only float summation order differs).

Run: python -m pytest -q tests/test_sensitivity_batch.py
"""

from __future__ import annotations

import pytest

from pgolf_pack.calib.sensitivity import measure_sensitivity
from pgolf_pack.errors import PgolfError


@pytest.fixture(scope="module")
def example(example_calibrated):
    loaded, hs, counts, toks = example_calibrated
    return loaded, hs, counts, toks[: 4 * 256 + 1]


def test_batched_scoring_keeps_the_multipliers(example):
    loaded, hs, counts, window = example
    names = ["blocks.0.attn.c_q.weight", "blocks.3.mlp.proj.weight"]
    one = measure_sensitivity(loaded, hs, window, counts, seqs=4, seq_len=256, names=names, batch=1)
    many = measure_sensitivity(loaded, hs, window, counts, seqs=4, seq_len=256, names=names, batch=4)
    assert set(one.tensor) == set(many.tensor) == set(names)
    for n in names:
        assert one.tensor[n] > 0
        assert abs(many.tensor[n] / one.tensor[n] - 1) < 0.02, (n, one.tensor[n], many.tensor[n])


def test_batch_must_be_positive(example):
    loaded, hs, counts, window = example
    with pytest.raises(PgolfError, match="batch"):
        measure_sensitivity(loaded, hs, window, counts, seqs=4, seq_len=256, batch=0)
