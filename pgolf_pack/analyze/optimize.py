"""Choose a scheme per tensor to lose the least under a byte budget, measured with the real packer.

Objective: the sum over tensors of the predicted loss increase of quantizing it,

* with a Hessian H = Σ xᵀx over ``count`` calibration rows: trace(ΔW H ΔWᵀ) / count, the mean
  squared error of the layer's output (ΔW = W − Ŵ);
* for a tensor without a Hessian while others have one: ‖ΔW‖² times the mean per-feature input
  power trace(H)/(count·in_features) of those others (an isotropic-input guess in the same units);
* without Hessians: ‖ΔW‖²;

each times the tensor's measured loss multiplier when a sensitivity map is given (``pgolf-pack
sensitivity``): the Hessian proxy is a per-layer output error, and equal output errors in
different layers do not cost equal loss.

Bytes: for every candidate scheme the whole model is quantized with it and packed with the real
packer and codec; each symbol group's payload is split over its tensors by their share of the
group's order-0 entropy, side groups by raw size. The final plan puts the tensors of one role that
chose different candidates into separate groups (``group = "<role>@<candidate>"``), so each group
is a subset of a measured one and the per-tensor figures add up. A greedy marginal-gain-per-byte
walk along each tensor's lower convex hull of (bytes, error) picks the plan; a real full pack then
checks it, and the budget is corrected by the measured miss and the plan re-solved (then, if still
over, stepped down) until the real artifact fits.

Candidates are recipe settings (what a ``[[rule]]`` holds, optionally with ``match``: a glob or a
list of globs the candidate is limited to), so any method the pipeline knows is a candidate:
``{"method": "gptq", "bits": 5, "lqer_rank": 4}`` or an embedding tier ``{"match": "*emb*", ...}``.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
import os
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .. import __version__
from ..checkpoint import check_finite, is_quantizable, to_float32
from ..errors import PgolfError
from ..fileio import atomic_write_bytes
from ..pack.packer import pack_model, role_of
from ..pipeline import quantize_tensors
from ..quant.base import QuantizedModel, QuantizedTensor, dequantize_float32
from ..quant.passthrough import store_float
from ..recipe import Recipe, recipe_from_dict
from .size import attribute_stream_bytes, entropy_weights

DEFAULT_BITS = (2, 3, 4, 5, 6, 7, 8)
# A smallest plan predicted this far (relative) over the budget is refused without a real pack.
CLEARLY_OVER = 0.02


def default_candidates(bits: Sequence[int] = DEFAULT_BITS, method: str = "rtn", clip: str = "sdclip") -> list[dict]:
    """Int-k per-row schemes with the clip width searched per tensor for least error."""
    return [{"method": method, "bits": int(b), "clip": clip} for b in bits]


def candidate_label(spec: Mapping) -> str:
    parts = [str(spec.get("method", "rtn"))]
    if "bits" in spec:
        parts.append(f"int{spec['bits']}")
    if "clip" in spec:
        parts.append(str(spec["clip"]))
    if "sigmas" in spec:
        parts.append(f"k{spec['sigmas']:g}")
    for k in sorted(set(spec) - {"method", "bits", "clip", "sigmas", "match"}):
        parts.append(f"{k}={spec[k]}")
    return "-".join(parts)


# --- recipes as TOML -------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_str(k)


def _public(spec: Mapping) -> dict:
    return {k: v for k, v in spec.items() if not k.startswith("_")}


def recipe_to_toml(recipe: Recipe, comment: str | None = None) -> str:
    """TOML text that :func:`pgolf_pack.recipe.load_recipe` reads back to the same recipe."""
    lines = [f"# {line}".rstrip() for line in (comment or "").splitlines()]
    lines += [f"min_numel = {_toml_value(recipe.min_numel)}", f"passthrough = {_toml_value(recipe.passthrough)}",
              "", "[default]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in _public(recipe.default).items()]
    for rule in recipe.rules:
        rule = _public(rule)
        lines += ["", "[[rule]]", f"match = {_toml_value(rule['match'])}"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in rule.items() if k != "match"]
    return "\n".join(lines) + "\n"


def recipe_text(recipe: Recipe, comment: str | None = None, where: str | os.PathLike = "recipe") -> str:
    """``recipe`` as editable TOML text, checked to read back identically (``where`` names it in errors)."""
    text = recipe_to_toml(recipe, comment)
    back = recipe_from_dict(tomllib.loads(text), str(where))
    want = recipe.to_dict()
    want["rule"] = [_public(r) for r in want["rule"]]
    want["default"] = _public(want["default"])
    if back.to_dict() != want:
        raise PgolfError(f"internal error: recipe TOML for {where} does not read back identically")
    return text


def save_recipe(recipe: Recipe, path: str | os.PathLike, comment: str | None = None) -> None:
    """Write ``recipe`` as an editable TOML file (atomically), checked to read back identically."""
    atomic_write_bytes(path, recipe_text(recipe, comment, path).encode())


def _exact_glob(name: str) -> str:
    """A glob matching exactly ``name`` (fnmatch has no escape character; brackets quote)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- errors ----------------------------------------------------------------------------------------


class ErrorModel:
    """Predicted loss increase of replacing W by Ŵ; see the module docstring."""

    def __init__(self, hessians: Mapping[str, np.ndarray] | None, counts: Mapping[str, int] | None,
                 shapes: Mapping[str, tuple], sensitivity: Mapping[str, float] | None = None):
        from ..quant.allocate import sensitivity_of

        # The Hessian proxy alone does not compare across layers; measured multipliers make it loss.
        self.sens = {name: sensitivity_of(name, sensitivity) for name in shapes}
        self.h: dict[str, np.ndarray] = {}
        powers = []
        for name, H in (hessians or {}).items():
            if name not in shapes:
                continue
            n_in = shapes[name][1]
            if tuple(H.shape) != (n_in, n_in):
                raise PgolfError(f"Hessian for {name} has shape {tuple(H.shape)}, expected {(n_in, n_in)}")
            c = float((counts or {}).get(name) or 1)
            Hn = np.asarray(H, dtype=np.float32) / np.float32(c)
            self.h[name] = Hn
            powers.append(float(np.trace(Hn.astype(np.float64))) / n_in)
        self.isotropic = float(np.mean(powers)) if powers else 1.0

    def __call__(self, name: str, w: np.ndarray, w_hat: np.ndarray) -> float:
        d = (np.asarray(w, np.float32) - np.asarray(w_hat, np.float32)).reshape(w.shape[0], -1)
        H = self.h.get(name)
        k = self.sens.get(name, 1.0)
        if H is None:
            return k * float(np.square(d, dtype=np.float64).sum()) * self.isotropic
        return k * float(((d @ H).astype(np.float64) * d).sum())


# --- measuring candidates --------------------------------------------------------------------------


@dataclass
class Option:
    cand: int
    bytes: float
    error: float


@dataclass
class Choice:
    name: str
    candidate: str
    spec: dict
    predicted_bytes: float
    error: float
    min_error: float  # the least error any candidate reaches for this tensor

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PackTrial:
    target: int  # the budget the greedy solved for
    predicted_bytes: int
    actual_bytes: int
    error: float


@dataclass
class OptimizeDetails:
    budget: int
    codec: str
    measure_codec: str
    candidates: list[str]
    choices: list[Choice]
    predicted_bytes: int
    actual_bytes: int
    error: float
    min_plan_bytes: int  # predicted size with every tensor at its cheapest candidate (header included)
    trials: list[PackTrial] = field(default_factory=list)
    blob: bytes = b""
    manifest: dict = field(default_factory=dict)

    @property
    def margin(self) -> int:
        return self.budget - self.actual_bytes

    def to_dict(self) -> dict:
        return {
            "budget": self.budget, "codec": self.codec, "measure_codec": self.measure_codec,
            "actual_bytes": self.actual_bytes,
            "predicted_bytes": self.predicted_bytes, "margin": self.margin, "error": self.error,
            "min_plan_bytes": self.min_plan_bytes, "candidates": self.candidates,
            "choices": [c.to_dict() for c in self.choices], "trials": [t.__dict__ for t in self.trials],
        }


def _applies(spec: Mapping, name: str) -> bool:
    m = spec.get("match")
    if m is None:
        return True
    globs = [m] if isinstance(m, str) else list(m)
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _measure(qm: QuantizedModel, codec: str, grouping: str, workers: int) -> tuple[dict[str, float], int]:
    """Real packed bytes of every tensor of ``qm`` (symbol groups split by entropy share, side
    groups by raw size) and the header+manifest bytes."""
    res = pack_model(qm, codec=codec, grouping=grouping, workers=workers)
    per_stream, head = attribute_stream_bytes(res.blob, res.manifest, entropy_weights(qm))
    return {t: float(sum(s.values())) for t, s in per_stream.items()}, head


def _hull(opts: list[Option]) -> list[Option]:
    """Lower convex hull of (bytes, error), cheapest first, error strictly falling."""
    pts: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.bytes, o.error)):
        if pts and o.error >= pts[-1].error:
            continue
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b sits on or above the segment a→o: it is never the best use of its bytes.
            if (b.error - a.error) * (o.bytes - a.bytes) >= (o.error - a.error) * (b.bytes - a.bytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def _greedy(hulls: dict[str, list[Option]], fixed: float, target: float) -> dict[str, int]:
    """Hull positions per tensor maximising error saved per byte within ``target`` total bytes."""
    pos = {n: 0 for n in hulls}
    total = fixed + sum(h[0].bytes for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], pos[n]
        if i + 1 < len(h):
            db = h[i + 1].bytes - h[i].bytes
            gain = (h[i].error - h[i + 1].error) / max(db, 1e-9)
            heapq.heappush(heap, (-gain, n))

    for n in sorted(hulls):
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        db = h[i + 1].bytes - h[i].bytes
        if total + db <= target:
            total += db
            pos[n] = i + 1
            push(n)
    return pos


def _plan_recipe(base: Recipe, names: list[str], chosen: dict[str, int], specs: list[dict],
                 labels: list[str], grouping: str) -> Recipe:
    """One explicit rule per tensor; roles whose tensors differ in candidate get one group each.

    ``[default]`` shows the most common choice when no rule lacks one of its keys (else only what
    every rule repeats), so no default setting can leak into a rule.
    """
    group_of = {n: role_of(n) if grouping == "role" else ("all" if grouping == "single" else n) for n in names}
    cands_in: dict[str, set] = {}
    for n in names:
        cands_in.setdefault(group_of[n], set()).add(chosen[n])
    rule_specs = []
    for n in names:
        spec = {k: v for k, v in specs[chosen[n]].items() if k != "match"}
        if len(cands_in[group_of[n]]) > 1 and "group" not in spec:
            spec["group"] = f"{group_of[n]}@{labels[chosen[n]]}"
        rule_specs.append((n, spec))
    counts = [0] * len(specs)
    for n in names:
        counts[chosen[n]] += 1
    top = {k: v for k, v in specs[int(np.argmax(counts))].items() if k not in ("match", "group")}
    if all(set(top) <= set(s) for _, s in rule_specs):
        default = top
    else:
        default = dict(rule_specs[0][1])
        for _, s in rule_specs[1:]:
            default = {k: v for k, v in default.items() if k in s and s[k] == v}
        default.pop("group", None)
    rules = [{"match": _exact_glob(n), **s} for n, s in rule_specs]
    return recipe_from_dict({"min_numel": base.min_numel, "passthrough": base.passthrough,
                             "default": default, "rule": rules}, "optimizer")


@dataclass
class Measurements:
    """Every candidate's quantized tensors, real bytes and errors: solve for any budget from it."""

    tensors: Mapping[str, torch.Tensor]
    names: list[str]  # the quantizable tensors
    specs: list[dict]
    labels: list[str]
    opts: dict[str, list[Option]]
    hulls: dict[str, list[Option]]
    cache: dict[tuple[str, int], QuantizedTensor]
    passthrough: list[QuantizedTensor]
    fixed: float  # passthrough bytes
    header: float  # header+manifest bytes of the measurement packs
    base: Recipe
    grouping: str
    measure_codec: str
    workers: int = 2

    def predicted(self, pos: Mapping[str, int]) -> float:
        return self.fixed + sum(self.hulls[n][pos[n]].bytes for n in self.names)

    def error(self, pos: Mapping[str, int]) -> float:
        return sum(self.hulls[n][pos[n]].error for n in self.names)


def measure_candidates(
    tensors: Mapping[str, torch.Tensor],
    hessians: Mapping[str, np.ndarray] | None = None,
    candidates: Sequence[Mapping] | None = None,
    measure_codec: str = "entropy",
    *,
    hessian_counts: Mapping[str, int] | None = None,
    base: Recipe | None = None,
    grouping: str = "role",
    workers: int = 2,
    on_step: Callable[[str], None] | None = None,
    sensitivity: Mapping[str, float] | None = None,
    device=None,
) -> Measurements:
    """Quantize the model with every candidate, pack it with the real packer, score the error.
    ``device``: where the candidates' sweeps run (gptq; the CPU by default)."""
    say = on_step or (lambda _msg: None)
    check_finite(tensors)
    base = base or Recipe()
    specs = []
    for i, c in enumerate(candidates if candidates is not None else default_candidates()):
        # The settings a recipe default would really give (built-in defaults filled in), so that
        # what was measured is exactly what the plan's recipe reproduces.
        eff = recipe_from_dict({"default": {k: v for k, v in c.items() if k != "match"}}, f"candidate {i + 1}").default
        specs.append({**eff, **({"match": c["match"]} if "match" in c else {})})
    if not specs:
        raise PgolfError("no candidate schemes given")
    labels = [candidate_label(s) for s in specs]
    labels = [f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    names = [n for n, t in tensors.items() if is_quantizable(t, base.min_numel)]
    if not names:
        raise PgolfError(f"no tensor is quantizable (2-D float with ≥ {base.min_numel} elements); nothing to optimize")
    for n in names:
        if not any(_applies(s, n) for s in specs):
            raise PgolfError(f"no candidate applies to tensor {n}")
    passthrough = [store_float(n, t, as_fp16=base.passthrough == "fp16") for n, t in tensors.items() if n not in names]
    errors = ErrorModel(hessians, hessian_counts, {n: tuple(tensors[n].shape) for n in names}, sensitivity)

    cache: dict[tuple[str, int], QuantizedTensor] = {}
    opts: dict[str, list[Option]] = {n: [] for n in names}
    fixed, headers = [], []
    for ci, spec in enumerate(specs):
        subset = {n: tensors[n] for n in names if _applies(spec, n)}
        if not subset:
            continue
        say(f"candidate {labels[ci]}: quantize {len(subset)} tensors")
        rec = recipe_from_dict({"min_numel": base.min_numel, "passthrough": base.passthrough,
                                "default": {k: v for k, v in spec.items() if k != "match"}}, labels[ci])
        qm = quantize_tensors(subset, rec, {k: v for k, v in (hessians or {}).items() if k in subset} or None,
                              device=device)
        say(f"candidate {labels[ci]}: pack ({measure_codec})")
        measured, head = _measure(QuantizedModel(qm.tensors + passthrough), measure_codec, grouping, workers)
        headers.append(head)
        fixed.append(sum(measured[p.name] for p in passthrough))
        for qt in qm.tensors:
            cache[(qt.name, ci)] = qt
            err = errors(qt.name, to_float32(tensors[qt.name]), dequantize_float32(qt))
            opts[qt.name].append(Option(ci, measured[qt.name], err))
    # Passthrough bytes barely move between candidates.
    return Measurements(tensors, names, specs, labels, opts, {n: _hull(o) for n, o in opts.items()}, cache,
                        passthrough, float(np.mean(fixed)), float(np.mean(headers)), base, grouping,
                        measure_codec, workers)


def _pack_plan(m: Measurements, pos: Mapping[str, int], codec: str) -> tuple[Recipe, bytes, dict]:
    """The real artifact of a plan, exactly as ``quantize`` with the plan's recipe writes it."""
    chosen = {n: m.hulls[n][pos[n]].cand for n in m.names}
    rec = _plan_recipe(m.base, m.names, chosen, m.specs, m.labels, m.grouping)
    group_of = {r["match"]: r.get("group") for r in rec.rules}
    by_name = {p.name: p for p in m.passthrough}
    out = []
    for n in m.tensors:
        if n not in chosen:
            out.append(by_name[n])
            continue
        qt = m.cache[(n, chosen[n])]
        params = {k: v for k, v in qt.params.items() if k != "group"}
        if group_of.get(_exact_glob(n)):
            params["group"] = group_of[_exact_glob(n)]
        out.append(QuantizedTensor(qt.name, qt.shape, qt.dtype, qt.scheme, params, qt.streams))
    # The same meta as quantize_tensors writes, so ``quantize --recipe`` reproduces these bytes.
    meta = {"pgolf_pack": __version__, "recipe": rec.to_dict()}
    res = pack_model(QuantizedModel(out, meta), codec=codec, grouping=m.grouping, workers=m.workers)
    return rec, res.blob, res.manifest


def plan_for_budget(
    m: Measurements,
    budget_bytes: int,
    codec: str = "auto-fast",
    max_packs: int = 3,
    on_step: Callable[[str], None] | None = None,
) -> tuple[Recipe, OptimizeDetails]:
    """Solve the measured candidates for ``budget_bytes``; verify (and repair) with real packs.

    The budget is validated by the quantize API (``pgolf_pack.api``); a non-positive one here is
    simply one that cannot be met."""
    say = on_step or (lambda _msg: None)
    names, hulls = m.names, m.hulls
    min_pos = {n: 0 for n in names}
    smallest = m.predicted(min_pos) + m.header
    if smallest > budget_bytes * (1 + CLEARLY_OVER):
        # Far beyond what a real pack could recover: say so without the expensive check.
        raise PgolfError(
            f"budget {budget_bytes:,} bytes cannot be met: even with every tensor at its smallest candidate "
            f"the artifact is about {smallest:,.0f} bytes (measured with {m.measure_codec}), "
            f"about {smallest - budget_bytes:,.0f} over")
    trials: list[PackTrial] = []
    best: tuple | None = None  # (error, pos, recipe, blob, manifest, predicted)

    def attempt(pos: dict[str, int], target: float) -> float:
        """Pack ``pos`` for real; keep it if it fits and is the best so far. Returns the miss."""
        nonlocal best
        rec, blob, manifest = _pack_plan(m, pos, codec)
        pred, err = m.predicted(pos), m.error(pos)
        trials.append(PackTrial(int(target), int(round(pred)), len(blob), err))
        if len(blob) <= budget_bytes and (best is None or err < best[0]):
            best = (err, dict(pos), rec, blob, manifest, pred)
        if len(blob) > budget_bytes and all(p == 0 for p in pos.values()):
            raise PgolfError(
                f"budget {budget_bytes:,} bytes cannot be met: even with every tensor at its smallest candidate "
                f"the artifact packs to {len(blob):,} bytes, {len(blob) - budget_bytes:,} over")
        return len(blob) - pred

    # The header+manifest is what the per-tensor figures leave out; the measurement packs show it.
    target = budget_bytes - m.header
    pos = _greedy(hulls, m.fixed, target)
    for _ in range(max(1, max_packs)):
        say(f"verify: full pack ({codec}) of the plan solved for {int(target):,} bytes")
        miss = attempt(pos, target)
        target = budget_bytes - miss
        nxt = _greedy(hulls, m.fixed, target)
        if nxt == pos or (best is not None and m.error(nxt) >= best[0]):
            break
        pos = nxt
    while best is None:
        # Still over: step back where the least error per byte is lost, then pack again.
        excess = m.predicted(pos) + miss - budget_bytes
        saved = 0.0
        while saved < excess * 1.02 + 16 and any(pos[n] > 0 for n in names):
            n = min((n for n in names if pos[n] > 0), key=lambda n: (
                (hulls[n][pos[n] - 1].error - hulls[n][pos[n]].error)
                / max(hulls[n][pos[n]].bytes - hulls[n][pos[n] - 1].bytes, 1e-9), n))
            saved += hulls[n][pos[n]].bytes - hulls[n][pos[n] - 1].bytes
            pos[n] -= 1
        say(f"repair: full pack ({codec}) after stepping down")
        miss = attempt(pos, m.predicted(pos))
    err, pos, rec, blob, manifest, pred = best
    choices = []
    for n in names:
        o = hulls[n][pos[n]]
        choices.append(Choice(n, m.labels[o.cand], {k: v for k, v in m.specs[o.cand].items() if k != "match"},
                              o.bytes, o.error, min(x.error for x in m.opts[n])))
    return rec, OptimizeDetails(int(budget_bytes), codec, m.measure_codec, m.labels, choices, int(round(pred)),
                                len(blob), err, int(round(smallest)), trials, blob, manifest)


def optimize_plan(
    tensors: Mapping[str, torch.Tensor],
    budget_bytes: int,
    hessians: Mapping[str, np.ndarray] | None = None,
    candidates: Sequence[Mapping] | None = None,
    codec: str = "auto-fast",
    *,
    hessian_counts: Mapping[str, int] | None = None,
    base: Recipe | None = None,
    grouping: str = "role",
    measure_codec: str | None = None,
    max_packs: int = 3,
    workers: int = 2,
    on_step: Callable[[str], None] | None = None,
    sensitivity: Mapping[str, float] | None = None,
    device=None,
) -> tuple[Recipe, OptimizeDetails]:
    """Pick a candidate per quantizable tensor, least predicted loss with real bytes ≤ budget.

    Returns the recipe (explicit per-tensor rules; reproduces the plan through ``quantize``) and
    details, including the verified artifact bytes (``details.blob``) of the final plan. For
    several budgets, call :func:`measure_candidates` once and :func:`plan_for_budget` per budget.

    ``measure_codec`` packs the candidates; by default ``codec``, except that for ``auto``/
    ``auto-fast`` it is ``entropy``: those keep the smallest of several codecs (``entropy`` among
    them) per group, so entropy-coded bytes bound theirs from above at a fraction of the time; the
    full packs that verify the plan use ``codec`` itself.
    """
    if measure_codec is None:
        measure_codec = "entropy" if codec in ("auto", "auto-fast") else codec
    m = measure_candidates(tensors, hessians, candidates, measure_codec, hessian_counts=hessian_counts, base=base,
                           grouping=grouping, workers=workers, on_step=on_step, sensitivity=sensitivity,
                           device=device)
    return plan_for_budget(m, budget_bytes, codec, max_packs, on_step)
