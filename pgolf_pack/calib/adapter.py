"""One contract for every command that runs a model: calibrate, sensitivity, eval, analyze rd.

``--model FILE.py:FACTORY`` calls ``FACTORY(state_dict, device) -> nn.Module``. ``--model FILE.py``
treats the file as a Parameter-Golf-style training script: it is imported as a module (so its
``if __name__ == "__main__"`` training never runs, and its ``Hyperparameters`` class body reads
the environment exactly as it does in training), its ``GPT`` (or the class named by
``--model-class``) is built from the Hyperparameters attributes that match the constructor's
parameter names (or from the Hyperparameters object itself, for ``GPT(h)``-style constructors),
and the checkpoint is loaded strictly. Without ``--model`` the reference GPT of :mod:`.model` is
built — through the same functions, so every command has one code path.

The forward is called as ``model(input_ids, target_ids)`` (``model(input_ids)`` when it takes a
single argument) and may return the mean next-token loss, as the challenge's scripts do, or
logits of shape (batch, seq, vocab); :func:`nll_sum` tells them apart.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import check_device  # noqa: F401 (commands import it from here)
from ..errors import PgolfError

# Names a Parameter Golf script gives its hyperparameters object when a constructor takes it whole.
_HPARAM_ARG_NAMES = ("h", "args", "hparams", "hp", "hyperparameters", "config", "cfg")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build: ``path`` None is the reference GPT."""

    path: Path | None = None
    factory: str | None = None
    model_class: str | None = None

    @classmethod
    def parse(cls, model: str | None, model_class: str | None = None) -> "ModelSpec":
        """``FILE.py`` or ``FILE.py:FACTORY`` (the colon split is the last one, after ``.py``)."""
        if model is None:
            if model_class is not None:
                raise PgolfError("--model-class needs --model FILE.py (it names a class in that file)")
            return cls()
        path, factory = model, None
        head, sep, tail = model.rpartition(":")
        if sep and head.endswith(".py") and tail.isidentifier():
            path, factory = head, tail
        elif sep and head.endswith(".py"):
            raise PgolfError(f"--model {model}: {tail!r} is not a Python function name")
        p = Path(path)
        if p.suffix != ".py":
            raise PgolfError(f"--model {model}: expected a Python file FILE.py or FILE.py:FACTORY")
        if not p.is_file():
            raise PgolfError(f"--model: file not found: {p}")
        if factory is not None and model_class is not None:
            raise PgolfError("give --model FILE.py:FACTORY or --model-class, not both (the factory builds the model)")
        return cls(p, factory, model_class)

    @property
    def is_reference(self) -> bool:
        return self.path is None


@dataclass
class LoadedModel:
    """A model ready to run, and what it was built from (shown to the user)."""

    module: nn.Module
    source: str
    settings: dict = field(default_factory=dict)
    # Weight name of a tied output head -> the module whose output feeds it (for the Hessian hooks).
    tied_head: dict[str, str] | None = None
    device: str = "cpu"

    def describe(self) -> str:
        if not self.settings:
            return self.source
        shown = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{self.source} ({shown})"

    def to_dict(self) -> dict:
        return {"source": self.source, "settings": {k: _jsonable(v) for k, v in self.settings.items()}}

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        """Replace the weights (same names and shapes, strictly): one model, many decoded artifacts."""
        check_state_dict(self.module, state_dict, self.source)
        _load_strict(self.module, state_dict)


def _jsonable(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """Every name and shape must match: a partial load would score a half-random model."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        raise PgolfError(f"the checkpoint does not load strictly into {what} ({'; '.join(parts)})")
    for name, ref in expected.items():
        got = state_dict[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise PgolfError(f"tensor {name} has shape {tuple(got.shape)}, {what} expects {tuple(ref.shape)}")
        if ref.is_floating_point() and not got.is_floating_point():
            raise PgolfError(f"tensor {name} has non-float dtype {got.dtype}")


def _load_strict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    # load_state_dict copies into the module's own dtypes (float32 for scripts and the reference).
    module.load_state_dict({k: v.detach() for k, v in state_dict.items()}, strict=True)


# --- importing a user's file ----------------------------------------------------------------------


def import_file(path: Path):
    """Import ``path`` as a module (never as ``__main__``), its directory first on sys.path.

    Executed afresh on every call: its Hyperparameters read the environment when the class body
    runs, so a cached module would keep the first call's settings.
    """
    path = path.resolve()
    name = f"pgolf_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PgolfError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and typing look the module up while it executes
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        del sys.modules[name]
        missing = e.name or str(e)
        raise PgolfError(
            f"cannot import {path.name}: it imports {missing!r}, which is not available here ({e}); "
            f"write a factory `def make_model(state_dict, device) -> nn.Module` in a file that does not "
            f"import it and pass --model FILE.py:make_model") from None
    except SystemExit as e:
        del sys.modules[name]
        raise PgolfError(f"importing {path.name} called sys.exit({e.code}); move that under "
                         "`if __name__ == \"__main__\":`") from None
    except Exception as e:
        del sys.modules[name]
        tb = e.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        where = f" (line {line})" if line else ""
        raise PgolfError(f"importing {path.name} failed{where}: {type(e).__name__}: {e}") from None
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return mod


def _module_classes(mod) -> list[str]:
    return sorted(n for n, v in vars(mod).items()
                  if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == mod.__name__)


def _constructor_args(cls: type, hp, file: str) -> tuple[dict, dict]:
    """(kwargs for ``cls``, what to show): each parameter from the Hyperparameters attribute of
    the same name, the Hyperparameters object itself for a ``GPT(h)`` constructor, else its default."""
    try:
        params = [p for p in inspect.signature(cls.__init__).parameters.values()][1:]
    except (TypeError, ValueError):
        params = []
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    kwargs: dict = {}
    shown: dict = {}
    unmatched = []
    for p in params:
        if hp is not None and hasattr(hp, p.name):
            kwargs[p.name] = shown[p.name] = getattr(hp, p.name)
        elif p.default is p.empty:
            unmatched.append(p)
    if unmatched:
        whole = [p for p in unmatched if p.name in _HPARAM_ARG_NAMES or
                 (isinstance(p.annotation, str) and p.annotation.endswith("Hyperparameters")) or
                 p.annotation is type(hp)]
        if hp is not None and len(unmatched) == 1 and whole:
            kwargs[whole[0].name], shown = _recording(hp)
        else:
            names = ", ".join(p.name for p in unmatched)
            src = "its Hyperparameters" if hp is not None else f"{file} (it has no Hyperparameters class)"
            raise PgolfError(f"{cls.__name__}({names}): no default and no attribute of that name in {src}; "
                             f"pass --model {file}:FACTORY with a function that builds the model")
    return kwargs, shown


def _recording(hp):
    """A stand-in for the Hyperparameters object (an instance of a subclass, so isinstance checks
    pass) that notes each attribute read: what a ``GPT(h)`` constructor used is what it read."""
    seen: dict = {}
    base = type(hp)

    class Recorded(base):
        def __getattribute__(self, name):
            value = super().__getattribute__(name)
            if not name.startswith("_") and not callable(value):
                seen.setdefault(name, value)
            return value

    Recorded.__name__, Recorded.__qualname__ = base.__name__, base.__qualname__
    rec = object.__new__(Recorded)
    rec.__dict__.update(vars(hp))
    return rec, seen


def _script_model(spec: ModelSpec, state_dict: Mapping[str, Tensor], device: str) -> LoadedModel:
    mod = import_file(spec.path)
    file = spec.path.name
    if spec.factory is not None:
        fn = getattr(mod, spec.factory, None)
        if not callable(fn):
            raise PgolfError(f"{file} has no function {spec.factory!r}")
        return LoadedModel(_call_factory(fn, state_dict, device, file, spec.factory), f"{spec.factory}() from {file}")
    name = spec.model_class or "GPT"
    cls = getattr(mod, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        found = _module_classes(mod)
        hint = f"; its nn.Module classes: {', '.join(found)} (pick one with --model-class)" if found else ""
        raise PgolfError(f"{file} defines no nn.Module class {name!r}{hint}")
    hp_cls = getattr(mod, "Hyperparameters", None)
    hp = None
    if inspect.isclass(hp_cls):
        try:
            hp = hp_cls()
        except Exception as e:
            raise PgolfError(f"{file}: Hyperparameters() failed: {type(e).__name__}: {e}") from None
    kwargs, shown = _constructor_args(cls, hp, file)
    try:
        module = cls(**kwargs)
    except PgolfError:
        raise
    except Exception as e:
        raise PgolfError(f"{file}: {name}(...) with its Hyperparameters failed: {type(e).__name__}: {e}") from None
    # Only what reached the constructor describes the model; the rest of the Hyperparameters
    # (paths, seeds, learning rates) are training settings. A snapshot: the forward reads more.
    return LoadedModel(module.float(), f"{name} from {file}", dict(shown))


def _call_factory(fn: Callable, state_dict, device: str, file: str, name: str) -> nn.Module:
    try:
        module = fn(dict(state_dict), device)
    except PgolfError:
        raise
    except Exception as e:
        raise PgolfError(f"{file}: {name}(state_dict, device) failed: {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise PgolfError(f"{file}: {name}(state_dict, device) returned {type(module).__name__}, not a torch.nn.Module")
    return module


def build_model(state_dict: Mapping[str, Tensor], spec: ModelSpec | None = None, device: str = "cpu",
                tied_head: Mapping[str, str] | None = None, **overrides) -> LoadedModel:
    """The model ``spec`` names, with ``state_dict`` loaded strictly, in eval mode on ``device``.

    ``overrides`` are reference-GPT config fields (``num_heads``, ...); ``tied_head`` maps a tied
    output weight's module-output feed (``{"final_norm": "tok_emb.weight"}``) for the Hessians.
    """
    spec = spec or ModelSpec()
    check_device(device)
    if spec.is_reference:
        from .model import GPT, GPTConfig

        cfg = GPTConfig.from_state_dict(state_dict, **overrides)
        loaded = LoadedModel(GPT(cfg), "reference GPT", {})
        if cfg.tie_embeddings:
            loaded.tied_head = {"final_norm": "tok_emb.weight"}
        what = f"the baseline GPT {cfg}"
    else:
        if overrides:
            raise PgolfError(f"{', '.join('--' + k.replace('_', '-') for k in overrides)} applies to the reference GPT "
                             "only; your model's shape comes from its own code")
        loaded = _script_model(spec, state_dict, device)
        what = loaded.source
    check_state_dict(loaded.module, state_dict, what)
    if spec.factory is None:  # a factory loads its own weights; its names were checked above
        _load_strict(loaded.module, state_dict)
    if tied_head:
        loaded.tied_head = dict(tied_head)
    loaded.module = loaded.module.to(device).eval()
    loaded.device = device
    return loaded


def load_model(checkpoint, model: str | None = None, *, model_class: str | None = None, device: str = "cpu",
               **overrides) -> nn.Module:
    """A checkpoint (path or state dict) as a ready ``nn.Module``: the reference GPT by default,
    or the model of ``model`` (``"train_gpt.py"`` or ``"file.py:factory"``), loaded strictly."""
    if isinstance(checkpoint, Mapping):
        sd = checkpoint
    else:
        from .calibrate import state_dict_of

        sd = state_dict_of(checkpoint)
    return build_model(sd, ModelSpec.parse(model, model_class), device, **overrides).module


def parse_tied_head(text: str | None) -> dict[str, str] | None:
    """``--tied-head NORM_MODULE=WEIGHT`` -> {module: weight}."""
    if text is None:
        return None
    out = {}
    for part in text.split(","):
        mod, sep, weight = part.strip().partition("=")
        if not sep or not mod or not weight:
            raise PgolfError(f"--tied-head expects MODULE=WEIGHT (e.g. final_norm=tok_emb.weight), got {part.strip()!r}")
        out[mod] = weight
    return out


# --- running it -----------------------------------------------------------------------------------


def _takes_targets(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def call_model(module: nn.Module, x: Tensor, y: Tensor):
    """The adapter's calling convention: ``model(input_ids, target_ids)``, or ``model(input_ids)``."""
    return module(x, y) if _takes_targets(module) else module(x)


def _what(out) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)} ({out.dtype})"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


def as_loss_or_logits(out, x: Tensor) -> tuple[str, Tensor]:
    """("loss", 0-d mean loss) or ("logits", (tokens, vocab)) from what the forward returned."""
    if isinstance(out, Tensor) and out.is_floating_point():
        if out.numel() == 1:
            return "loss", out.reshape(())
        if out.dim() == 3 and tuple(out.shape[:2]) == tuple(x.shape):
            return "logits", out.reshape(-1, out.size(-1))
        if out.dim() == 2 and out.shape[0] == x.numel():
            return "logits", out
    raise PgolfError(f"the model's forward returned {_what(out)} for input ids of shape {tuple(x.shape)}; expected the "
                     "mean next-token loss (a scalar) or logits of shape (batch, seq, vocab)")


def nll_sum(module: nn.Module, x: Tensor, y: Tensor, autocast_bf16: bool = False,
            per_token_float64: bool = True) -> tuple[float, int | None]:
    """Summed next-token loss in nats over the ``y.numel()`` targets, and the vocab (logits only).

    Logits are scored in float32 as the baseline does; ``per_token_float64`` sums the per-token
    losses in float64 (eval), else takes cross entropy's own float32 sum (the sensitivity scores).
    A mean loss is scaled back to a sum.
    """
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        out = call_model(module, x, y)
    kind, t = as_loss_or_logits(out, x)
    t = t.detach()
    if kind == "loss":
        return float(t.double()) * y.numel(), None
    if per_token_float64:
        nll = F.cross_entropy(t.float(), y.reshape(-1).to(device), reduction="none")
        return float(nll.double().sum()), int(t.size(-1))
    return float(F.cross_entropy(t.float(), y.reshape(-1).to(device), reduction="sum").double()), int(t.size(-1))


def loss_sum(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Summed next-token loss in nats over ``y.numel()`` targets as a 0-d tensor that keeps the
    autograd graph (what :func:`nll_sum` returns as a float), for gradients of the loss."""
    kind, t = as_loss_or_logits(call_model(module, x, y), x)
    if kind == "loss":
        return t.float() * y.numel()
    return F.cross_entropy(t.float(), y.reshape(-1).to(x.device), reduction="sum")


def module_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))
