"""Rendering shared by commands (not a command module): size tables, quantize results and the
progress of the quantize API's stages."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from ..api import BitBudgetPlan, Progress, QuantizeResult, RDPlan
from ..pipeline import PackReport
from .app import console, err_console, fmt_int


def render_pack_report(rep: PackReport, title: str) -> None:
    t = Table(title=title)
    for col, just in [("tensor", "left"), ("params", "right"), ("scheme", "left"), ("bytes", "right"),
                      ("bits/param", "right"), ("rel. error", "right")]:
        t.add_column(col, justify=just)
    for r in rep.rows:
        err = "" if r.rel_error != r.rel_error else f"{r.rel_error:.4f}"
        t.add_row(r.name, fmt_int(r.params), r.scheme, fmt_int(r.bytes), f"{r.bits_per_param:.3f}", err)
    t.add_row("(header + manifest)", "", "", fmt_int(rep.header_bytes), "", "")
    total_params = sum(r.params for r in rep.rows)
    t.add_section()
    t.add_row("total", fmt_int(total_params), "", fmt_int(rep.total_bytes), f"{8 * rep.total_bytes / max(total_params, 1):.3f}", "")
    console.print(t)
    verdict = "fits" if rep.margin >= 0 else "OVER"
    console.print(f"artifact {fmt_int(rep.total_bytes)} bytes vs cap {fmt_int(rep.cap)}: {verdict}, margin "
                  f"{fmt_int(rep.margin)} bytes (code bytes not included; see `analyze budget`)")


def render_quantize(res: QuantizeResult) -> None:
    plan, out = res.plan, res.artifact
    if isinstance(plan, BitBudgetPlan):
        det = res.optimizer
        render_pack_report(res.report, f"{out} (budget {fmt_int(plan.budget)})")
        console.print(f"optimizer: {fmt_int(det.actual_bytes)} bytes packed for a budget of {fmt_int(plan.budget)} "
                      f"(margin {fmt_int(det.margin)}); plan saved to {res.recipe_path} — edit it and re-run with --recipe")
    elif isinstance(plan, RDPlan) and plan.budget is None:
        render_pack_report(res.report, f"{out} ({plan.method}, λ {res.lam:.6g})")
    elif isinstance(plan, RDPlan):
        render_pack_report(res.report, f"{out} ({plan.method}, budget {fmt_int(plan.budget)})")
        console.print(f"λ search: {len(res.history)} packs; λ {res.lam:.6g} gives {fmt_int(res.bytes)} bytes for a budget "
                      f"of {fmt_int(plan.budget)} (margin {fmt_int(plan.budget - res.bytes)}); --lam {res.lam!r} "
                      "reproduces it without the search")
    else:
        render_pack_report(res.report, f"{out}")


def warn(msg: str) -> None:
    err_console.print(f"warning: {msg}", markup=False)


class StageProgress:
    """Progress bars on stderr (stdout stays parseable) for the API's :class:`Progress` events:
    one bar per stage, replaced when the next stage starts."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bars: RichProgress | None = None
        self._task = None
        self._stage: str | None = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)

    def __call__(self, ev: Progress) -> None:
        if not self.enabled:
            return
        if self._bars is None:
            # Started by the first event, not on entry: a refusal before any work prints only its
            # error line (a stopped live display leaves a blank line on a non-terminal stderr).
            self._bars = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[item]}"), console=err_console,
                                      transient=True)
            self._bars.__enter__()
        if ev.stage != self._stage:
            if self._task is not None:
                self._bars.remove_task(self._task)
            self._task = self._bars.add_task(ev.stage, total=ev.total, item="")
            self._stage = ev.stage
        self._bars.update(self._task, completed=ev.done, item=ev.item)
