"""One entry point for every quantize path: a plan in, one artifact and one result out.

Three plans:

* :class:`RecipePlan` — per-tensor schemes from a recipe, with optional LQER and token
  frequencies (which rank embedding rows for ``row_bits``);
* :class:`BitBudgetPlan` — bit widths per tensor chosen for the least predicted loss whose real
  packed bytes fit a budget (:mod:`pgolf_pack.analyze.optimize`);
* :class:`RDPlan` — rate–distortion quantization (ecsq | rdoq | trellis) at one λ, fixed or
  searched so the real packed artifact fits a budget (:mod:`pgolf_pack.rd_search`).

:func:`quantize` works on tensors in memory and returns the artifact bytes in ``result.blob``;
:func:`quantize_file` reads a checkpoint, checks the plan, every path and option before any work,
and writes the artifact (and the bit-budget plan's recipe) in one place, atomically.
Inputs a plan takes as data (recipe, sensitivity, token counts) may also be given as file paths:
then they are read here and checked against the outputs.

``device`` says where the torch sweeps run (GPTQ, ECSQ, RDOQ, trellis: Hessian factorization and
error feedback); it is a keyword of the calls, not a plan field, because it changes where the work
runs, not what the artifact is. Numpy-only methods (rtn, e8p, float) always run on the CPU, and a
GPU asked for a plan that has nothing else is refused. On CUDA the float32 error feedback may
round differently in the last bits than on the CPU, so a few codes can differ from a CPU run.
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Union

import numpy as np
import torch

from .analyze.optimize import OptimizeDetails, default_candidates, optimize_plan, recipe_text
from .checkpoint import DEFAULT_MIN_NUMEL, is_quantizable, load_checkpoint
from .device import check_device, device_name
from .errors import PgolfError
from .fileio import atomic_write_bytes, check_outputs
from .pack.packer import _check_codec, pack_model, unpack_model
from .pipeline import DEVICE_METHODS, NEEDS_HESSIAN, LqerOptions, PackReport, quantize_tensors, report
from .quant.allocate import METHODS as RD_METHODS
from .quant.allocate import RDConfig, load_sensitivity, prepare_model, quantize_model_rd
from .quant.base import QuantizedModel
from .rd_search import BudgetPoint, fit_budget
from .recipe import Recipe, load_recipe, recipe_from_dict

PathLike = Union[str, os.PathLike]
SensitivityArg = Union[Mapping[str, float], PathLike, None]
GROUPINGS = ("role", "tensor", "single")  # what pack.packer.build_groups accepts


@dataclass(frozen=True)
class RecipePlan:
    """Every tensor as ``recipe`` says (a :class:`Recipe` or a TOML/JSON file)."""

    recipe: Recipe | PathLike = field(default_factory=Recipe)
    lqer: LqerOptions | None = None
    # Per-token-id counts, or a glob of TRAIN token shards to count: ranks embedding rows for row_bits.
    token_freq: np.ndarray | str | None = None
    codec: str = "auto"
    grouping: str = "role"


@dataclass(frozen=True)
class BitBudgetPlan:
    """A candidate scheme per quantizable tensor, least predicted loss with real bytes ≤ ``budget``."""

    budget: int
    candidates: tuple = tuple(default_candidates())  # recipe settings, e.g. {"method": "gptq", "bits": 5}
    sensitivity: SensitivityArg = None  # tensor name or glob -> loss multiplier, or its JSON file
    min_numel: int = DEFAULT_MIN_NUMEL
    passthrough: str = "float"
    codec: str = "auto"
    grouping: str = "role"
    recipe_out: PathLike | None = None  # quantize_file writes the chosen recipe here (default OUTPUT.recipe.toml)


@dataclass(frozen=True)
class RDPlan:
    """One λ for the whole model: ``lam`` fixed, or searched so the artifact fits ``budget``."""

    budget: int | None = None
    lam: float | None = None
    sensitivity: SensitivityArg = None
    config: RDConfig = field(default_factory=lambda: RDConfig(method="ecsq"))
    codec: str = "entropy"  # the rate–distortion methods price bits with the entropy coder's model
    grouping: str = "role"

    @property
    def method(self) -> str:
        return self.config.method


Plan = Union[RecipePlan, BitBudgetPlan, RDPlan]


@dataclass(frozen=True)
class Progress:
    """A progress event: ``stage`` started (``done == 0``) or finished its ``done``-th step.
    ``total`` is None when the number of steps is not known in advance (a search)."""

    stage: str
    total: int | None
    done: int
    item: str = ""


OnProgress = Callable[[Progress], None]


@dataclass
class QuantizeResult:
    plan: Plan
    report: PackReport
    blob: bytes
    manifest: dict
    qm: QuantizedModel
    artifact: Path | None = None
    lam: float | None = None  # RDPlan: the λ used (found, with a budget)
    history: list[BudgetPoint] = field(default_factory=list)  # RDPlan: every pack the search made
    optimizer: OptimizeDetails | None = None  # BitBudgetPlan
    recipe: Recipe | None = None  # BitBudgetPlan: the chosen plan; reproduces the artifact through RecipePlan
    recipe_path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return len(self.blob)

    def to_dict(self) -> dict:
        out: dict = {} if self.artifact is None else {"artifact": str(self.artifact)}
        if isinstance(self.plan, BitBudgetPlan):
            if self.recipe_path is not None:
                out["recipe"] = str(self.recipe_path)
            out["optimizer"] = self.optimizer.to_dict()
        elif isinstance(self.plan, RDPlan):
            out.update({"method": self.plan.method, "bytes": self.bytes, "budget": self.plan.budget, "lambda": self.lam,
                        "history": [{"lambda": p.lam, "bytes": p.bytes, "seconds": p.seconds} for p in self.history]})
        return {**out, **self.report.to_dict()}


# --- checking a plan before any work ---------------------------------------------------------------


@dataclass
class _Inputs:
    """What a plan reads, resolved: loaded data and the input files (checked against the outputs)."""

    recipe: Recipe | None = None
    sensitivity: dict[str, float] | None = None
    token_freq: np.ndarray | None = None
    paths: list[Path] = field(default_factory=list)


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise PgolfError(f"--budget must be a positive number of bytes, got {budget}")


def _sensitivity(value: SensitivityArg, inputs: _Inputs) -> dict[str, float] | None:
    if value is None or isinstance(value, Mapping):
        return None if value is None else {str(k): float(v) for k, v in value.items()}
    inputs.paths.append(Path(value))
    return load_sensitivity(value)


def _token_freq(value, inputs: _Inputs) -> np.ndarray | None:
    if value is None or isinstance(value, np.ndarray):
        return value
    from .calib.shards import load_tokens, shard_paths
    from .quant.mixed_rows import token_counts

    inputs.paths += [Path(p) for p in shard_paths(value)]
    toks = load_tokens(value)
    if toks.size == 0:
        raise PgolfError(f"no tokens in {value}")
    return token_counts(toks, int(toks.max()) + 1)


def _has_row_bits(recipe: Recipe) -> bool:
    return any(spec.get("row_bits") for spec in (recipe.default, *recipe.rules))


def _plan_methods(plan: Plan, inputs: _Inputs) -> list[str]:
    """The methods a plan may run, in order of first mention (a rule without one keeps the default's)."""
    if isinstance(plan, RDPlan):
        return [plan.method]
    if isinstance(plan, RecipePlan):
        rec = inputs.recipe
        found = [rec.default.get("method", "rtn")] + [r["method"] for r in rec.rules if "method" in r]
    else:
        found = [c.get("method", "rtn") for c in plan.candidates]
    return list(dict.fromkeys(found))


def _check_device(plan: Plan, inputs: _Inputs, device) -> None:
    """Spelling first, then whether the plan has a sweep for it, then whether the machine has it:
    so a GPU asked of a numpy-only plan says why on any machine."""
    d = device_name(device)
    if d != "cpu" and not isinstance(plan, RDPlan):
        methods = _plan_methods(plan, inputs)
        if not any(m in DEVICE_METHODS for m in methods):
            what = f"method {methods[0]} runs" if len(methods) == 1 else f"methods {', '.join(methods)} run"
            raise PgolfError(f"--device {d} does not apply: {what} in numpy on the CPU (a device serves the "
                             f"sweeps of {', '.join(DEVICE_METHODS)} and rdoq)")
    check_device(d)


def check_plan(plan: Plan, have_hessians: bool, device="cpu") -> _Inputs:
    """Refuse a plan that cannot run, whose options would be ignored, or that asks for a device it
    cannot use or this machine lacks; read its input files."""
    inputs = _Inputs()
    if not isinstance(plan, (RecipePlan, BitBudgetPlan, RDPlan)):
        raise PgolfError(f"not a quantize plan: {type(plan).__name__}")
    _check_codec(plan.codec)
    if plan.grouping not in GROUPINGS:
        raise PgolfError(f"unknown grouping {plan.grouping!r}; choose role, tensor or single")
    if isinstance(plan, RecipePlan):
        if isinstance(plan.recipe, Recipe):
            inputs.recipe = plan.recipe
        else:
            inputs.paths.append(Path(plan.recipe))
            inputs.recipe = load_recipe(plan.recipe)
        if plan.lqer is not None and plan.lqer.top_k > 0 and plan.lqer.weighted and not have_hessians:
            raise PgolfError("activation-weighted LQER needs Hessians (--hessians)")
        if plan.token_freq is not None and not _has_row_bits(inputs.recipe):
            raise PgolfError("token frequencies (--tokens) only rank embedding rows for row_bits, and nothing asks "
                             "for row_bits (--row-bits or a recipe rule)")
        inputs.token_freq = _token_freq(plan.token_freq, inputs)
    elif isinstance(plan, BitBudgetPlan):
        _check_budget(plan.budget)
        if not plan.candidates:
            raise PgolfError("no candidate schemes given")
        for i, c in enumerate(plan.candidates):
            spec = recipe_from_dict({"default": {k: v for k, v in c.items() if k != "match"}}, f"candidate {i + 1}").default
            if spec["method"] in NEEDS_HESSIAN and not have_hessians:
                raise PgolfError(f"candidate {i + 1} (method {spec['method']}) needs Hessians, but no Hessian file "
                                 "was given (--hessians)")
        if plan.passthrough not in ("float", "fp16"):
            raise PgolfError("passthrough must be 'float' or 'fp16'")
        inputs.sensitivity = _sensitivity(plan.sensitivity, inputs)
    else:
        method = plan.method
        if plan.budget is None and plan.lam is None:
            raise PgolfError(f"--method {method} needs --budget BYTES (λ searched to fit) or --lam λ (loss per bit, fixed)")
        if plan.budget is not None and plan.lam is not None:
            raise PgolfError("give --budget or --lam, not both (--budget searches λ itself)")
        if plan.lam is not None and not (plan.lam > 0 and math.isfinite(plan.lam)):
            raise PgolfError(f"--lam must be a positive number, got {plan.lam}")
        if plan.budget is not None:
            _check_budget(plan.budget)
        inputs.sensitivity = _sensitivity(plan.sensitivity, inputs)
    _check_device(plan, inputs, device)
    return inputs


def _unmatched(sens: Mapping[str, float] | None, names: list[str]) -> list[str]:
    # A typo in a sensitivity file would leave that tensor at 1.0 without a word.
    return [f"sensitivity entry {key!r} matches no quantized tensor" for key in sens or {}
            if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names)]


# --- running a plan --------------------------------------------------------------------------------


def _stage(progress: OnProgress | None, stage: str, total: int | None) -> Callable[[str], None]:
    """Announce ``stage``; returns the callback that reports each finished step."""
    if progress is None:
        return lambda _item: None
    progress(Progress(stage, total, 0))
    done = 0

    def step(item: str) -> None:
        nonlocal done
        done += 1
        progress(Progress(stage, total, done, item))

    return step


def _run(tensors: Mapping[str, torch.Tensor], plan: Plan, inputs: _Inputs, hessians, counts,
         progress: OnProgress | None, warn: Callable[[str], None] | None, device: str = "cpu") -> QuantizeResult:
    warnings: list[str] = []

    def say(msg: str) -> None:
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    if isinstance(plan, RecipePlan):
        step = _stage(progress, "quantize", len(tensors))
        qm = quantize_tensors(tensors, inputs.recipe, hessians, step, plan.lqer, inputs.token_freq, device=device)
        res = pack_model(qm, codec=plan.codec, grouping=plan.grouping)
        return QuantizeResult(plan, report(res.blob, res.manifest, qm, tensors), res.blob, res.manifest, qm)

    if isinstance(plan, BitBudgetPlan):
        names = [n for n, t in tensors.items() if is_quantizable(t, plan.min_numel)]
        for msg in _unmatched(inputs.sensitivity, names):
            say(msg)
        step = _stage(progress, "optimize", None)
        rec, det = optimize_plan(tensors, plan.budget, hessians, list(plan.candidates), plan.codec,
                                 hessian_counts=counts, base=Recipe(min_numel=plan.min_numel, passthrough=plan.passthrough),
                                 grouping=plan.grouping, sensitivity=inputs.sensitivity, on_step=step, device=device)
        # The report needs the quantized tensors; the verified artifact is all the optimizer returns.
        qm, manifest = unpack_model(det.blob)
        return QuantizeResult(plan, report(det.blob, manifest, qm, tensors), det.blob, manifest, qm,
                              optimizer=det, recipe=rec, warnings=warnings)

    mp = prepare_model(tensors, hessians, plan.config, counts, inputs.sensitivity, device=device)
    for msg in _unmatched(inputs.sensitivity, [t.name for t in mp.tensors]):
        say(msg)
    if plan.budget is not None:
        budget = plan.budget
        step = _stage(progress, f"{plan.method}: λ search", None)
        found = fit_budget(mp, budget, codec=plan.codec, grouping=plan.grouping,
                           on_point=lambda p: step(f"λ {p.lam:.4g} → {p.bytes:,} bytes "
                                                   f"({'fits' if p.bytes <= budget else 'over'})"))
        qm, res, lam, history = found.qm, found.pack, found.lam, found.history
    else:
        lam = float(plan.lam)
        t0 = time.perf_counter()
        qm = quantize_model_rd(mp, lam, on_tensor=_stage(progress, f"{plan.method}: λ {lam:.4g}", len(mp.tensors)))
        res = pack_model(qm, codec=plan.codec, grouping=plan.grouping)
        history = [BudgetPoint(lam, len(res.blob), time.perf_counter() - t0)]
    return QuantizeResult(plan, report(res.blob, res.manifest, qm, tensors), res.blob, res.manifest, qm,
                          lam=lam, history=history, warnings=warnings)


def quantize(
    tensors: Mapping[str, torch.Tensor],
    plan: Plan,
    hessians: Mapping[str, np.ndarray] | None = None,
    counts: Mapping[str, int] | None = None,
    progress: OnProgress | None = None,
    warn: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> QuantizeResult:
    """Quantize and pack ``tensors`` (a state dict) as ``plan`` says; the artifact is ``result.blob``.

    ``hessians``/``counts``: Hessians and their sample counts (``calib.hessian.load_hessians``);
    ``progress`` receives :class:`Progress` events, ``warn`` each warning (also in ``result.warnings``);
    ``device`` ("cpu", "cuda", "cuda:N"): where the torch sweeps run (see the module docstring).
    """
    inputs = check_plan(plan, hessians is not None, device)
    return _run(tensors, plan, inputs, hessians, counts, progress, warn, device)


def quantize_file(
    checkpoint: PathLike,
    output: PathLike,
    plan: Plan,
    hessians: PathLike | Mapping[str, np.ndarray] | None = None,
    counts: Mapping[str, int] | None = None,
    progress: OnProgress | None = None,
    warn: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> QuantizeResult:
    """Quantize the checkpoint at ``checkpoint`` as ``plan`` says and write the artifact to ``output``.

    ``hessians`` is a Hessian file (``pgolf-pack calibrate``; its counts are read with it) or the
    Hessians themselves (then ``counts`` as in :func:`quantize`). Everything is checked before
    any work: the plan and ``device``, that no output overwrites an input, that output directories exist. A
    :class:`BitBudgetPlan` also writes the recipe it chose (``plan.recipe_out``, by default
    OUTPUT.recipe.toml), which reproduces the artifact through a :class:`RecipePlan`.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    h_path = None if hessians is None or isinstance(hessians, Mapping) else Path(hessians)
    inputs = check_plan(plan, hessians is not None, device)
    sources = [checkpoint, h_path, *inputs.paths]
    recipe_path = None
    if isinstance(plan, BitBudgetPlan):
        recipe_path = Path(plan.recipe_out) if plan.recipe_out is not None else output.with_name(output.name + ".recipe.toml")
    check_outputs([output, recipe_path], sources)
    tensors = load_checkpoint(checkpoint)
    if h_path is not None:
        from .calib.hessian import load_hessians

        hessians, counts = load_hessians(h_path)
    result = _run(tensors, plan, inputs, hessians, counts, progress, warn, device)
    text = None
    if recipe_path is not None:
        text = recipe_text(result.recipe, f"pgolf-pack quantize --budget {plan.budget}: {result.bytes} bytes", recipe_path)
    # The one place a quantize writes: the artifact, then the recipe that reproduces it.
    atomic_write_bytes(output, result.blob)
    result.artifact = output
    if text is not None:
        atomic_write_bytes(recipe_path, text.encode())
        result.recipe_path = recipe_path
    return result


__all__ = ["RecipePlan", "BitBudgetPlan", "RDPlan", "Plan", "Progress", "QuantizeResult", "LqerOptions", "RDConfig",
           "RD_METHODS", "check_plan", "quantize", "quantize_file"]
