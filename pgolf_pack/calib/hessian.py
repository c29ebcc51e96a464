"""Collect GPTQ Hessians H = Σ xᵀx from any torch model, and store them in a safetensors file.

Drop into a training script::

    with HessianCollector(model, tied_lm_head={"final_norm": "tok_emb.weight"}) as hc:
        for batch in calibration_batches:
            model(batch)
    save_hessians("hessians.safetensors", hc.hessians(), hc.counts())

Each batch's xᵀx is computed in float32 (float64 for float64 inputs) and accumulated across
batches in the collector's dtype (float64 by default). Forward hooks fire on every call, so a layer
run several times per forward (depth recurrence, activation checkpointing's recomputation)
accumulates every call; hooks need eager execution (not a torch.compile'd graph).

File format (``save_hessians`` / ``load_hessians``): a safetensors file with one float32 tensor per
weight, keyed by its state-dict name (``blocks.0.attn.c_q.weight``), holding the **sum**
H = Σ xᵀx (in_features × in_features) over all calibration rows x of that layer's input. The
safetensors metadata holds ``format = "pgolf-hessians"``, ``version = "1"``, ``reduction = "sum"``,
``counts`` = JSON {weight name: number of rows summed} and ``meta`` = JSON of free-form user data.
Divide by the count for the mean; GPTQ's damping is relative to mean(diag H), so either works.
Files without our metadata (a plain name -> square matrix safetensors) load with empty counts.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import PgolfError
from ..fileio import atomic_write

FORMAT = "pgolf-hessians"
VERSION = "1"

Include = Optional[Union[Callable[[str, nn.Module], bool], Iterable[str]]]


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, Mapping):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _linear_weight(mod: nn.Module) -> torch.Tensor | None:
    """The module's own 2-D weight, if it may be applied as ``x @ W.T``."""
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return None
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        return w
    return None


class _GramCache:
    """xᵀx of the most recent input, so layers fed the same tensor (c_q, c_k, c_v) share one product.

    A weak reference: while that input is alive its memory cannot be reused, so identity plus an
    unchanged version counter means unchanged data, and nothing is kept alive past its use.
    """

    def __init__(self) -> None:
        self.x: weakref.ref | None = None
        self.version = -1
        self.gram: torch.Tensor | None = None

    def gram_of(self, x: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
        try:
            version = x._version
        except RuntimeError:  # inference-mode tensors have no version counter: never share
            version = None
        if version is not None and self.x is not None and self.x() is x and version == self.version and self.gram.dtype == dtype:
            return self.gram
        # One batch's product in float32 (float64 inputs stay float64): fp64 GEMM costs twice as
        # much on CPU and its precision only matters across batches, where we accumulate in `dtype`.
        xx = x.detach().reshape(-1, features)
        xx = xx.to(torch.float64 if xx.dtype == torch.float64 else torch.float32)
        gram = (xx.T @ xx).to(dtype)
        if version is not None:
            self.x, self.version, self.gram = weakref.ref(x), version, gram
        else:
            self.clear()
        return gram

    def clear(self) -> None:
        self.x, self.version, self.gram = None, -1, None


class _Accumulator:
    def __init__(self, name: str, features: int, dtype: torch.dtype, strict: bool, cache: _GramCache):
        self.name = name
        self.features = features
        self.dtype = dtype
        self.strict = strict  # False: a module that turns out not to be a linear layer is dropped
        self.cache = cache
        self.h: torch.Tensor | None = None
        self.count = 0
        self.dropped = False

    def add(self, x: torch.Tensor | None, where: str) -> None:
        if self.dropped:
            return
        if x is None or not torch.is_floating_point(x) or x.shape[-1] != self.features:
            if self.strict:
                got = "no tensor" if x is None else f"shape {tuple(x.shape)} ({x.dtype})"
                raise PgolfError(
                    f"Hessian hook for {self.name}: {where} is {got}, expected last dimension {self.features}"
                )
            self.dropped = True
            return
        gram = self.cache.gram_of(x, self.features, self.dtype)
        if self.h is None:
            self.h = torch.zeros((self.features, self.features), dtype=self.dtype, device=gram.device)
        self.h += gram.to(self.h.device)
        self.count += x.numel() // self.features


class HessianCollector:
    """Forward hooks accumulating H = Σ xᵀx of each linear layer's input (and of a tied LM head).

    ``include``: None = every module with its own 2-D ``weight`` (nn.Linear and subclasses, or any
    custom layer applying ``x @ W.T``; embeddings excluded; a module whose input does not match its
    weight is silently dropped); a callable ``(weight_name, module) -> bool``; or a list of weight
    or module names (these must match, else the forward raises). ``tied_lm_head`` maps the module
    whose output feeds a tied LM head (e.g. ``"final_norm"``) to the tied weight's name
    (e.g. ``"tok_emb.weight"``); that weight's H comes from the module's outputs.

    ``functional=True`` also collects every other 2-D parameter that the forward passes itself as
    the weight of ``F.linear`` (a tied head ``F.linear(x, tok_emb.weight)``, a custom layer's
    ``F.linear(x, self.w)``), from that call's input; it needs the collector as a context manager
    (``with HessianCollector(...) as hc``), which is when the interception is active. A cast,
    slice or reshape of a parameter is a new tensor and cannot be traced back to it.
    ``lookup_embeddings=True`` gives an ``nn.Embedding`` weight that got no Hessian otherwise (a
    lookup table, not an output head) ``H = (lookups / rows) · I``: a lookup's output error is
    the row's error, so the count-normalised H = I / rows makes ``trace(ΔW H ΔWᵀ)`` the mean
    squared output error over rows, and GPTQ on it is plain rounding, which is all a table allows.
    """

    def __init__(
        self,
        model: nn.Module,
        include: Include = None,
        tied_lm_head: Mapping[str, str] | None = None,
        dtype: torch.dtype = torch.float64,
        functional: bool = False,
        lookup_embeddings: bool = False,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise PgolfError(f"Hessian accumulation dtype must be float32 or float64, got {dtype}")
        self._dtype = dtype
        self._acc: dict[str, _Accumulator] = {}
        self._functional: dict[str, _Accumulator] = {}
        self._handles: list = []
        self._cache = _GramCache()
        modules = dict(model.named_modules())
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update({k: v for k, v in model.named_buffers(remove_duplicate=False)})

        for wname, mod, strict in self._select(modules, include):
            w = _linear_weight(mod)
            acc = _Accumulator(wname, int(w.shape[1]), dtype, strict, self._cache)
            self._acc[wname] = acc
            self._handles.append(mod.register_forward_hook(self._input_hook(acc), with_kwargs=True))

        for mname, wname in (tied_lm_head or {}).items():
            if mname not in modules:
                raise PgolfError(f"tied LM head: model has no module named {mname!r}")
            w = params.get(wname)
            if w is None or w.ndim != 2:
                raise PgolfError(f"tied LM head: model has no 2-D parameter named {wname!r}")
            if wname in self._acc:
                raise PgolfError(f"tied LM head: {wname} is already collected from a linear layer's input")
            acc = _Accumulator(wname, int(w.shape[1]), dtype, True, self._cache)
            self._acc[wname] = acc
            self._handles.append(modules[mname].register_forward_hook(self._output_hook(acc)))

        self._by_id: dict[int, _Accumulator] = {}
        self._watch: dict[int, str] = {}
        self._uses: dict[str, set[str]] = {}
        self._mode: _FunctionalCapture | None = None
        if functional or lookup_embeddings:
            for pname, p in model.named_parameters():
                if p.ndim == 2 and p.is_floating_point() and pname not in self._acc:
                    self._watch[id(p)] = pname
                    if functional:
                        acc = _Accumulator(pname, int(p.shape[1]), dtype, True, self._cache)
                        self._functional[pname] = acc
                        self._by_id[id(p)] = acc
        self._lookups: dict[str, list] = {}
        if lookup_embeddings:
            for mname, mod in modules.items():
                w = getattr(mod, "weight", None)
                wname = f"{mname}.weight" if mname else "weight"
                if isinstance(mod, nn.Embedding) and wname not in self._acc:
                    entry = [int(w.shape[0]), int(w.shape[1]), 0]
                    self._lookups[wname] = entry
                    self._handles.append(mod.register_forward_hook(self._lookup_hook(entry)))

    @staticmethod
    def _select(modules: dict[str, nn.Module], include: Include):
        def wname(mname: str) -> str:
            return f"{mname}.weight" if mname else "weight"

        linear = [(m, mod) for m, mod in modules.items() if _linear_weight(mod) is not None]
        if include is None:
            return [(wname(m), mod, isinstance(mod, nn.Linear)) for m, mod in linear]
        if callable(include):
            return [(wname(m), mod, isinstance(mod, nn.Linear)) for m, mod in linear if include(wname(m), mod)]
        if isinstance(include, str):
            include = [include]
        by_name = {wname(m): (m, mod) for m, mod in linear}
        by_name.update({m: (m, mod) for m, mod in linear})
        chosen: dict[str, nn.Module] = {}
        for n in include:
            if n not in by_name:
                hint = "it has no 2-D weight" if n in modules or n.removesuffix(".weight") in modules else "no such module"
                raise PgolfError(f"cannot collect a Hessian for {n!r}: {hint}")
            m, mod = by_name[n]
            chosen[wname(m)] = mod
        return [(w, mod, True) for w, mod in chosen.items()]

    @staticmethod
    def _input_hook(acc: _Accumulator):
        def hook(_mod, args, kwargs, _out):
            x = _first_tensor(args) if args else _first_tensor(kwargs)
            acc.add(x, "its input")

        return hook

    @staticmethod
    def _lookup_hook(entry: list):
        def hook(_mod, args, _out):
            ids = _first_tensor(args)
            if ids is not None:
                entry[2] += ids.numel()

        return hook

    @staticmethod
    def _output_hook(acc: _Accumulator):
        def hook(_mod, _args, out):
            acc.add(_first_tensor(out), "its output")

        return hook

    def names(self) -> list[str]:
        return [n for n, a in self._acc.items() if not a.dropped]

    def _seen(self) -> dict[str, _Accumulator]:
        seen = {n: a for n, a in self._acc.items() if not a.dropped and a.h is not None}
        seen.update({n: a for n, a in self._functional.items() if a.h is not None and n not in seen})
        return seen

    def lookup_names(self) -> list[str]:
        """Embedding tables given the lookup Hessian (see the class docstring): those the forward
        used for lookups only; a table also used some other way (a head computed as ``x @ W.T``)
        is left without one, so the gap is reported instead of hidden."""
        seen = self._seen()
        return [n for n, (_, _, c) in self._lookups.items()
                if c and n not in seen and self._uses.get(n, set()) <= {"embedding"}]

    def uses(self) -> dict[str, list[str]]:
        """Parameter name -> the torch functions the forward passed it to, for 2-D parameters
        outside Linear-like modules (needs ``functional`` or ``lookup_embeddings``)."""
        return {n: sorted(u) for n, u in self._uses.items()}

    def hessians(self) -> dict[str, np.ndarray]:
        """Weight name -> H (sum over rows, accumulation dtype) for every layer that saw input."""
        out = {n: a.h.cpu().numpy().copy() for n, a in self._seen().items()}
        np_dtype = np.float64 if self._dtype == torch.float64 else np.float32
        for n in self.lookup_names():
            rows, dim, count = self._lookups[n]
            out[n] = np.eye(dim, dtype=np_dtype) * (count / rows)
        return out

    def counts(self) -> dict[str, int]:
        out = {n: a.count for n, a in self._seen().items()}
        out.update({n: self._lookups[n][2] for n in self.lookup_names()})
        return out

    def reset(self) -> None:
        self._cache.clear()
        for a in (*self._acc.values(), *self._functional.values()):
            a.h, a.count = None, 0
        for entry in self._lookups.values():
            entry[2] = 0
        self._uses.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def __enter__(self) -> "HessianCollector":
        if self._watch:
            self._mode = _FunctionalCapture(self._by_id, self._watch, self._uses)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _func_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a tensor property such as .T: name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _FunctionalCapture(TorchFunctionMode):
    """Sees every torch function call the forward makes (nn.Linear's own F.linear included): feeds
    the input of ``F.linear`` calls whose weight is one of the collected parameters, and notes
    which functions each watched parameter is passed to. Identity is safe because the parameters
    stay alive; a cast, slice or reshape of one is a new tensor and is not followed."""

    def __init__(self, by_id: Mapping[int, _Accumulator], watch: Mapping[int, str], uses: dict[str, set[str]]):
        super().__init__()
        self.by_id, self.watch, self.uses = by_id, watch, uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                name = self.watch.get(id(a))
                if name is not None:
                    self.uses.setdefault(name, set()).add(_func_name(func))
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            acc = self.by_id.get(id(w))
            if acc is not None:
                acc.add(args[0] if args else kwargs.get("input"), "the input of its F.linear call")
        return func(*args, **kwargs)


def _check_h(name: str, h: np.ndarray, where: str) -> None:
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise PgolfError(f"{where}: Hessian {name} has shape {tuple(h.shape)}; expected a square in_features² matrix")
    if not np.all(np.isfinite(h)):
        raise PgolfError(f"{where}: Hessian {name} contains NaN or Inf")
    if np.any(np.diagonal(h) < 0):
        raise PgolfError(f"{where}: Hessian {name} has a negative diagonal entry; it is not a sum of xᵀx")


def save_hessians(
    path: str | os.PathLike,
    hessians: Mapping[str, np.ndarray],
    counts: Mapping[str, int] | None = None,
    meta: Mapping | None = None,
    dtype=np.float32,
) -> Path:
    """Atomically write the Hessian file described in the module docstring; same input, same bytes."""
    tensors = {}
    for name, h in hessians.items():
        h = np.asarray(h.cpu().numpy() if isinstance(h, torch.Tensor) else h)
        _check_h(name, h, "save_hessians")
        tensors[name] = np.ascontiguousarray(h, dtype=dtype)
    counts = dict(counts or {})
    unknown = sorted(set(counts) - set(tensors))
    if unknown:
        raise PgolfError(f"save_hessians: counts given for names without a Hessian: {', '.join(unknown)}")
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "reduction": "sum",
        "counts": json.dumps({k: int(v) for k, v in counts.items()}),
        "meta": json.dumps(dict(meta or {})),
    }
    return atomic_write(path, lambda p: _write_safetensors(p, tensors, metadata))


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """The safetensors layout written by hand, keys sorted: the library writes its metadata map in
    hash order, so two runs of the same calibration gave files with different bytes."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise PgolfError(f"save_hessians: Hessians are stored as float32 or float64, not {t.dtype}")
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to a multiple of 8
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in sorted(tensors):
            f.write(tensors[name].astype(tensors[name].dtype.newbyteorder("<"), copy=False).tobytes())


def load_hessians(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Read a Hessian file: (weight name -> H as stored, weight name -> sample count)."""
    hs, counts, _ = load_hessians_with_meta(path)
    return hs, counts


def load_hessians_with_meta(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, int], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"Hessian file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            hs = {k: f.get_tensor(k) for k in f.keys()}
    except PgolfError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise PgolfError(f"cannot read Hessian file {path}: {e}") from None
    if metadata.get("format", FORMAT) != FORMAT:
        raise PgolfError(f"{path} is not a pgolf-pack Hessian file (format {metadata.get('format')!r})")
    if metadata.get("version", VERSION) != VERSION:
        raise PgolfError(f"{path}: unsupported Hessian file version {metadata.get('version')!r}")
    for name, h in hs.items():
        if h.dtype not in (np.float32, np.float64):
            raise PgolfError(f"{path}: Hessian {name} has dtype {h.dtype}; expected float32 or float64")
        _check_h(name, h, str(path))
    try:
        counts = {k: int(v) for k, v in json.loads(metadata.get("counts", "{}")).items()}
        meta = json.loads(metadata.get("meta", "{}"))
    except (ValueError, TypeError, AttributeError):
        raise PgolfError(f"{path}: malformed counts/meta metadata") from None
    for k, v in counts.items():
        if k not in hs or v < 0:
            raise PgolfError(f"{path}: bad sample count {v} for {k!r}")
    return hs, counts, meta


def check_hessians_match(hessians: Mapping[str, np.ndarray], weights: Mapping[str, tuple[int, ...]]) -> None:
    """Raise PgolfError unless each Hessian names a 2-D weight and is in_features² for it."""
    for name, h in hessians.items():
        if name not in weights:
            raise PgolfError(f"Hessian {name} names no tensor of the checkpoint")
        shape = tuple(weights[name])
        if len(shape) != 2:
            raise PgolfError(f"Hessian {name}: the tensor has shape {shape}, not a 2-D matrix")
        if tuple(h.shape) != (shape[1], shape[1]):
            raise PgolfError(f"Hessian {name} is {h.shape[0]}×{h.shape[1]}, but {name} {shape} needs {shape[1]}×{shape[1]}")
