"""Recipes: which quantization scheme each tensor gets.

A recipe is a default scheme for quantizable tensors plus ordered rules ``match`` (a glob over
tensor names) → settings; later rules override earlier ones. Files are TOML or JSON::

    min_numel = 4096          # 2-D float tensors with fewer elements stay in float
    passthrough = "float"     # or "fp16": how non-quantized tensors are stored
    [default]
    method = "gptq"
    bits = 6
    clip = "sdclip"
    [[rule]]
    match = "tok_emb.weight"
    bits = 8
    sigmas = 20.0

A rule whose glob matches no tensor is an error: a typo must not silently change nothing.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import DEFAULT_MIN_NUMEL, is_quantizable
from .errors import PgolfError
from .quant.rtn import CLIP_RULES

METHODS = ("rtn", "gptq", "e8p", "ecsq", "trellis", "float", "fp16")
# Settings a rule may carry. Scheme-specific extras are validated by the method that reads them.
SPEC_KEYS = {
    "method", "bits", "clip", "sigmas", "group",
    "block_size", "damp", "act_order",
    "rht", "seed", "ldlq", "fallback", "fallback_bits",
    "delta", "row_mode", "col_beta", "rdoq", "iters", "rate_model", "coding",
    "lqer_rank", "lqer_bits", "lqer_group", "lqer_weighted",
    "row_bits",
}
EMBED_GLOB = "*emb*"


@dataclass
class Recipe:
    default: dict = field(default_factory=lambda: {"method": "rtn", "bits": 6, "clip": "sdclip"})
    rules: list[dict] = field(default_factory=list)
    min_numel: int = DEFAULT_MIN_NUMEL
    passthrough: str = "float"

    def to_dict(self) -> dict:
        return {"min_numel": self.min_numel, "passthrough": self.passthrough, "default": dict(self.default),
                "rule": [dict(r) for r in self.rules]}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _choices(key: str) -> tuple:
    # Imported only for a recipe that sets the key, so a plain recipe pays for none of these modules.
    if key == "row_mode":
        from .quant.ecsq import ROW_MODES

        return ROW_MODES
    if key == "rate_model":
        from .quant.rdoq import RATE_MODELS

        return RATE_MODELS
    if key == "coding":
        from .quant.trellis import CODINGS

        return CODINGS
    from .quant.lqer import WEIGHTINGS

    return WEIGHTINGS


# What each numeric or flag setting must be: a test and the words for the error.
_VALUE_RULES = {
    "bits": (lambda v: _is_int(v) and 2 <= v <= 8, "an integer in 2..8"),
    "fallback_bits": (lambda v: _is_int(v) and 2 <= v <= 8, "an integer in 2..8"),
    "lqer_bits": (lambda v: _is_int(v) and 2 <= v <= 8, "an integer in 2..8"),
    "sigmas": (lambda v: _is_number(v) and v > 0, "a positive number (a clip width in row std)"),
    "delta": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "damp": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "col_beta": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "rdoq": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "block_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "iters": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lqer_rank": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lqer_group": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "fallback": (lambda v: _is_int(v) and v >= 0, "a count of tensors >= 0"),
    "seed": (_is_int, "an integer"),
    "act_order": (lambda v: isinstance(v, bool), "true or false"),
    "rht": (lambda v: isinstance(v, bool), "true or false"),
    "ldlq": (lambda v: isinstance(v, bool), "true or false"),
    "group": (lambda v: isinstance(v, str) and v != "", "a non-empty group name"),
    "match": (lambda v: isinstance(v, str) and v != "", "a non-empty glob"),
}


def _check_spec(where: str, spec) -> None:
    if not isinstance(spec, Mapping):
        raise PgolfError(f"{where} must be a table of settings, got {_kind(spec)}")
    unknown = set(spec) - SPEC_KEYS - {"match"}
    if unknown:
        raise PgolfError(f"{where}: unknown setting(s) {', '.join(sorted(map(str, unknown)))}")
    m = spec.get("method")
    if m is not None and (not isinstance(m, str) or m not in METHODS):
        raise PgolfError(f"{where}: unknown method {m!r}; choose one of {', '.join(METHODS)}")
    clip = spec.get("clip")
    if clip is not None and (not isinstance(clip, str) or clip not in CLIP_RULES):
        raise PgolfError(f"{where}: unknown clip {clip!r}; choose one of {', '.join(CLIP_RULES)}")
    for key in ("row_mode", "rate_model", "coding"):
        v = spec.get(key)
        if v is not None and (not isinstance(v, str) or v not in _choices(key)):
            raise PgolfError(f"{where}: {key} must be one of {', '.join(_choices(key))}, got {v!r}")
    w = spec.get("lqer_weighted")
    if w is not None and not isinstance(w, bool) and (not isinstance(w, str) or w not in _choices("lqer_weighted")):
        raise PgolfError(f"{where}: lqer_weighted must be true, false or one of {', '.join(_choices('lqer_weighted'))}, "
                         f"got {w!r}")
    for key, (ok, what) in _VALUE_RULES.items():
        if key in spec and spec[key] is not None and not ok(spec[key]):
            raise PgolfError(f"{where}: {key} must be {what}, got {spec[key]!r}")
    if spec.get("row_bits") is not None:
        from .quant.mixed_rows import parse_row_bits

        if not isinstance(spec["row_bits"], str):
            raise PgolfError(f"{where}: row_bits must be a string such as '10%:8,rest:6', got {spec['row_bits']!r}")
        try:
            parse_row_bits(spec["row_bits"])
        except PgolfError as e:
            raise PgolfError(f"{where}: {e}") from None


def _kind(v) -> str:
    return {type(None): "null", list: "a list", str: "a string", bool: "a boolean"}.get(type(v), type(v).__name__)


def recipe_from_dict(d: Mapping, source: str = "recipe") -> Recipe:
    if not isinstance(d, Mapping):
        raise PgolfError(f"{source}: a recipe must be a table (min_numel, passthrough, default, rule), got {_kind(d)}")
    extra = set(d) - {"min_numel", "passthrough", "default", "rule", "rules"}
    if extra:
        raise PgolfError(f"{source}: unknown top-level key(s) {', '.join(sorted(map(str, extra)))}")
    r = Recipe()
    if "default" in d:
        _check_spec(f"{source} [default]", d["default"])
        r.default = {**r.default, **d["default"]}
    rules = d.get("rule", d.get("rules", []))
    if not isinstance(rules, list):
        raise PgolfError(f"{source}: 'rule' must be a list of tables ([[rule]] in TOML), got {_kind(rules)}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            raise PgolfError(f"{source} rule {i + 1} must be a table of settings, got {_kind(rule)}")
        if "match" not in rule:
            raise PgolfError(f"{source} rule {i + 1} has no 'match' glob")
        _check_spec(f"{source} rule {i + 1} ({rule['match']})", rule)
        r.rules.append(dict(rule))
    min_numel = d.get("min_numel", r.min_numel)
    if not _is_int(min_numel) or min_numel < 0:
        raise PgolfError(f"{source}: min_numel must be an integer >= 0, got {min_numel!r}")
    r.min_numel = min_numel
    r.passthrough = d.get("passthrough", r.passthrough)
    if r.passthrough not in ("float", "fp16"):
        raise PgolfError(f"{source}: passthrough must be 'float' or 'fp16', got {r.passthrough!r}")
    return r


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except UnicodeDecodeError:
        raise PgolfError(f"cannot parse recipe {path}: not a text file (expected TOML or JSON)") from None
    except OSError as e:
        raise PgolfError(f"cannot read recipe {path}: {e.strerror}") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise PgolfError(f"cannot parse recipe {path}: {e}") from None
    return recipe_from_dict(d, str(path))


def simple_recipe(
    method: str = "rtn",
    bits: int = 6,
    embed_bits: int | None = None,
    clip: str = "sdclip",
    sigmas: float | None = None,
    embed_sigmas: float | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    passthrough: str = "float",
) -> Recipe:
    """The common case from CLI flags: one scheme, optionally other bits for the embedding."""
    default = {"method": method, "bits": bits, "clip": clip}
    if sigmas is not None:
        default["sigmas"] = sigmas
    rules = []
    if embed_bits is not None or embed_sigmas is not None:
        rule: dict = {"match": EMBED_GLOB}
        if embed_bits is not None:
            rule["bits"] = embed_bits
        if embed_sigmas is not None:
            rule["sigmas"] = embed_sigmas
        rules.append(rule)
    r = recipe_from_dict({"default": default, "rule": rules, "min_numel": min_numel, "passthrough": passthrough}, "options")
    # The embedding rule comes from a convenience flag: a model without embeddings is fine.
    r.rules = [{**x, "_optional": True} for x in r.rules]
    return r


def plan(tensors: Mapping[str, torch.Tensor], recipe: Recipe) -> dict[str, dict]:
    """Resolve the settings of every tensor. Float tensors get method 'float' or 'fp16'."""
    out: dict[str, dict] = {}
    hits = [0] * len(recipe.rules)
    for name, t in tensors.items():
        quantizable = is_quantizable(t, recipe.min_numel)
        spec = dict(recipe.default) if quantizable else {"method": recipe.passthrough}
        for i, rule in enumerate(recipe.rules):
            if fnmatch.fnmatchcase(name, rule["match"]):
                hits[i] += 1
                # Bits etc. only concern quantized tensors. A glob that sweeps over small control
                # tensors leaves them in float; naming one exactly with a quantizer is an error.
                explicit = rule["match"] == name and "method" in rule
                if quantizable or explicit or rule.get("method") in ("float", "fp16"):
                    spec.update({k: v for k, v in rule.items() if k not in ("match", "_optional")})
        if spec["method"] not in ("float", "fp16") and not quantizable:
            raise PgolfError(f"tensor {name} (shape {tuple(t.shape)}) cannot be quantized with {spec['method']}")
        out[name] = spec
    for rule, n in zip(recipe.rules, hits):
        if n == 0 and not rule.get("_optional"):
            raise PgolfError(f"recipe rule {rule['match']!r} matches no tensor in the checkpoint")
    return out
