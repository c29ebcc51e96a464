"""Shared CLI plumbing: the Typer app, error handling, JSON output and progress bars."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from ..errors import PgolfError

# Typer vendors click in recent versions and depends on it in older ones: find its base error class
# through a public name rather than importing either.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(TyperGroup):
    """Typer's own usage errors (a missing or unknown option, a value of the wrong type or out of
    range) end like every other user error: one ``error:`` line and exit 1, not a usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK_ERROR as e:
            if any(c.__name__ == "NoArgsIsHelpError" for c in type(e).__mro__):
                e.show()  # the help text a bare command asked for
                sys.exit(e.exit_code)
            err_console.print(f"error: {' '.join(e.format_message().split())}", markup=False, soft_wrap=True)
            sys.exit(1)
        except typer.Abort:
            err_console.print("error: aborted", markup=False)
            sys.exit(1)
        # Without standalone mode an Exit (ours, or typer's on Ctrl-C) comes back as its code.
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="pgolf-pack",
    help="Quantize and pack small LM checkpoints into the smallest artifact that still scores well.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
analyze_app = typer.Typer(help="Where the bytes go: size tables, budget against the cap, RMS analysis.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")

# Tables carry long tensor names; when piped (no terminal to measure) use a wide fixed width.
_WIDTH = int(os.environ.get("COLUMNS", "0")) or (None if sys.stdout.isatty() else 150)
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False)

JsonOpt = typer.Option(False, "--json", help="Print a machine-readable JSON result instead of tables.")


def handle_errors(fn: Callable) -> Callable:
    """User errors become one line on stderr and exit code 1 — never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PgolfError as e:
            err_console.print(f"error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("error: interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def print_json(obj) -> None:
    typer.echo(json.dumps(_clean(obj), indent=2, sort_keys=False))


@contextmanager
def progress(enabled: bool, total: int | None, description: str) -> Iterator[Callable[[str], None]]:
    """A rich progress bar (on stderr, so --json output stays clean); yields an advance callback.
    ``total=None`` when the number of steps is not known in advance (a search)."""
    if not enabled:
        yield lambda _name: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[item]}"), console=err_console, transient=True) as prog:
        task = prog.add_task(description, total=total, item="")
        yield lambda name: prog.update(task, advance=1, item=name)


def fmt_int(n: int) -> str:
    return f"{n:,}"
