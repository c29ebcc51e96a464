import json

import pytest
import torch

from pgolf_pack.errors import PgolfError
from pgolf_pack.recipe import load_recipe, plan, recipe_from_dict, simple_recipe


def test_simple_recipe_routes_embedding_and_passthrough(state_dict):
    specs = plan(state_dict, simple_recipe(bits=6, embed_bits=8))
    assert specs["tok_emb.weight"]["bits"] == 8
    assert specs["blocks.0.mlp.fc.weight"] == {"method": "rtn", "bits": 6, "clip": "sdclip"}
    # 32x64 = 2048 elements is below the default threshold: stays float, like 1-D controls.
    assert specs["blocks.0.attn.c_k.weight"]["method"] == "float"
    assert specs["blocks.0.attn_scale"]["method"] == "float"


def test_rules_apply_in_order_and_fp16_passthrough(state_dict):
    r = recipe_from_dict({
        "passthrough": "fp16",
        "default": {"bits": 5},
        "rule": [{"match": "blocks.*.mlp.*", "bits": 4}, {"match": "blocks.1.mlp.fc.weight", "bits": 7}],
    })
    specs = plan(state_dict, r)
    assert specs["blocks.0.mlp.fc.weight"]["bits"] == 4
    assert specs["blocks.1.mlp.fc.weight"]["bits"] == 7
    assert specs["blocks.0.attn.c_q.weight"]["bits"] == 5
    assert specs["skip_weights"]["method"] == "fp16"


def test_toml_and_json_files(tmp_path, state_dict):
    t = tmp_path / "r.toml"
    t.write_text('min_numel = 1\n[default]\nbits = 4\n[[rule]]\nmatch = "tok_emb.weight"\nbits = 8\n')
    specs = plan(state_dict, load_recipe(t))
    assert specs["blocks.0.attn.c_k.weight"]["bits"] == 4  # min_numel lowered
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"default": {"bits": 3}}))
    assert plan(state_dict, load_recipe(j))["blocks.0.mlp.fc.weight"]["bits"] == 3


@pytest.mark.parametrize("bad, msg", [
    ({"rule": [{"match": "nope.*", "bits": 4}]}, "matches no tensor"),
    ({"default": {"bits": 9}}, "bits must be"),
    ({"default": {"method": "magic"}}, "unknown method"),
    ({"default": {"bitz": 4}}, "unknown setting"),
    ({"rules_typo": []}, "unknown top-level"),
    ({"rule": [{"bits": 4}]}, "no 'match'"),
])
def test_bad_recipes_are_rejected(bad, msg, state_dict):
    with pytest.raises(PgolfError, match=msg):
        plan(state_dict, recipe_from_dict(bad))


def test_cannot_quantize_1d_tensor(state_dict):
    r = recipe_from_dict({"rule": [{"match": "skip_weights", "method": "rtn"}]})
    with pytest.raises(PgolfError, match="cannot be quantized"):
        plan(state_dict, r)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(PgolfError, match="not found"):
        load_recipe(tmp_path / "missing.toml")


def test_embed_flag_without_embedding_is_fine():
    sd = {"w": torch.randn(128, 64)}
    assert plan(sd, simple_recipe(embed_bits=8))["w"]["bits"] == 6
