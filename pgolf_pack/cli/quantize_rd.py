"""quantize --method ecsq|rdoq|trellis: every matrix's step from one λ (loss per bit), fixed by
--lam or searched so the real packed artifact fits --budget."""

from __future__ import annotations

import fnmatch
import math
import time
from pathlib import Path
from typing import Optional

from ..errors import PgolfError
from .app import console, err_console, fmt_int, print_json, progress
from .core import render_pack_report

# allocate.METHODS, spelled out so that a plain RTN run does not import the RD machinery.
RD_METHODS = ("ecsq", "rdoq", "trellis")
# Options of the recipe paths that the λ allocation would silently ignore.
_RECIPE_ONLY = ("--recipe", "--embed-bits", "--sigmas", "--embed-sigmas", "--lqer-top-k", "--lqer-weighted",
                "--row-bits", "--tokens", "--save-recipe")


def check_rd_options(method: str, rd: bool, lam: Optional[float], sensitivity: Optional[Path],
                     budget: Optional[int], given: dict[str, bool]) -> None:
    """Refuse flag combinations that would be ignored; ``given`` maps a recipe-path flag to
    whether the user set it. The budget optimizer of the other methods also reads --sensitivity."""
    if rd:
        clash = [f for f in _RECIPE_ONLY if given.get(f)]
        if clash:
            raise PgolfError(f"{clash[0]} does not apply to --method {method}: one λ sets every matrix's step "
                             "(use a recipe with method 'ecsq' or 'trellis' for per-tensor settings)")
    elif lam is not None or (sensitivity is not None and budget is None):
        raise PgolfError(f"--{'lam' if lam is not None else 'sensitivity'} applies only to --method ecsq, rdoq, "
                         f"trellis{' or with --budget' if lam is None else ''}, not {method}")


def _warn_unmatched(sens: dict[str, float] | None, names: list[str]) -> None:
    # A typo in a sensitivity file would leave that tensor at 1.0 without a word.
    for key in sens or {}:
        if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names):
            err_console.print(f"warning: sensitivity entry {key!r} matches no quantized tensor", markup=False)


def quantize_rd(checkpoint: Path, output: Path, method: str, budget: Optional[int], lam: Optional[float],
                hessians: Optional[Path], sensitivity: Optional[Path], codec: str, grouping: str, min_numel: int,
                passthrough: str, json_out: bool) -> None:
    from ..calib.hessian import load_hessians
    from ..checkpoint import load_checkpoint
    from ..fileio import atomic_write_bytes, check_not_input
    from ..pack.packer import _check_codec, pack_model
    from ..pipeline import report
    from ..quant.allocate import BudgetPoint, RDConfig, fit_budget, load_sensitivity, prepare_model, quantize_model_rd

    if budget is None and lam is None:
        raise PgolfError(f"--method {method} needs --budget BYTES (λ searched to fit) or --lam λ (loss per bit, fixed)")
    if budget is not None and lam is not None:
        raise PgolfError("give --budget or --lam, not both (--budget searches λ itself)")
    if lam is not None and not (lam > 0 and math.isfinite(lam)):
        raise PgolfError(f"--lam must be a positive number, got {lam}")
    if budget is not None and budget <= 0:
        raise PgolfError(f"--budget must be a positive number of bytes, got {budget}")
    # Fail on a bad codec or path before the minutes of quantization, not after.
    _check_codec(codec)
    check_not_input(output, checkpoint, hessians, sensitivity)
    if not output.parent.exists():
        raise PgolfError(f"output directory does not exist: {output.parent}")

    cfg = RDConfig(method=method, min_numel=min_numel, passthrough=passthrough)
    sens = load_sensitivity(sensitivity)
    H, counts = load_hessians(hessians) if hessians is not None else (None, None)
    tensors = load_checkpoint(checkpoint)
    mp = prepare_model(tensors, H, cfg, counts, sens)
    _warn_unmatched(sens, [t.name for t in mp.tensors])

    if budget is not None:
        with progress(not json_out, None, f"{method}: λ search") as step:
            res = fit_budget(mp, budget, codec=codec, grouping=grouping,
                             on_point=lambda p: step(f"λ {p.lam:.4g} → {fmt_int(p.bytes)} bytes "
                                                     f"({'fits' if p.bytes <= budget else 'over'})"))
        qm, pack, lam, history = res.qm, res.pack, res.lam, res.history
    else:
        t0 = time.perf_counter()
        with progress(not json_out, len(mp.tensors), f"{method}: λ {lam:.4g}") as step:
            qm = quantize_model_rd(mp, lam, on_tensor=step)
        pack = pack_model(qm, codec=codec, grouping=grouping)
        history = [BudgetPoint(lam, len(pack.blob), time.perf_counter() - t0)]

    atomic_write_bytes(output, pack.blob)
    rep = report(pack.blob, pack.manifest, qm, tensors)
    if json_out:
        print_json({"artifact": str(output), "method": method, "bytes": len(pack.blob), "budget": budget, "lambda": lam,
                    "history": [{"lambda": p.lam, "bytes": p.bytes, "seconds": p.seconds} for p in history],
                    **rep.to_dict()})
        return
    if budget is None:
        render_pack_report(rep, f"{output} ({method}, λ {lam:.6g})")
        return
    render_pack_report(rep, f"{output} ({method}, budget {fmt_int(budget)})")
    console.print(f"λ search: {len(history)} packs; λ {lam:.6g} gives {fmt_int(len(pack.blob))} bytes for a budget of "
                  f"{fmt_int(budget)} (margin {fmt_int(budget - len(pack.blob))}); --lam {lam!r} reproduces it without the search")
