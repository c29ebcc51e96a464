"""Atomic writes: outputs appear complete or not at all, and inputs are never overwritten."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import PgolfError


def check_not_input(out: Path, *inputs: Path | None) -> None:
    check_outputs([out], inputs)


def _same_file(a: Path, b: Path) -> bool:
    """Same path after resolving symlinks, or one file under two names (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None]) -> None:
    """The one rule for a command's output paths, applied before any work so a refusal writes
    nothing: an output is never one of the inputs (symlinks and hard links resolved), never
    another output, never an existing directory, and its directory exists and is writable."""
    ins = [Path(p) for p in inputs if p is not None]
    outs: list[Path] = []
    for out in outputs:
        if out is None:
            continue
        out = Path(out)
        for inp in ins:
            if _same_file(out, inp):
                raise PgolfError(f"refusing to overwrite the input file {inp}; choose another output path")
        for other in outs:
            if _same_file(out, other):
                raise PgolfError(f"refusing to overwrite the output {other} with another output; choose different paths")
        if out.is_dir():
            raise PgolfError(f"output {out} is an existing directory; give a file path")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise PgolfError(f"output directory does not exist: {parent}")
        # As root os.access says yes to everything; atomic_write reports a refusal then.
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PgolfError(f"output directory is not writable: {parent}")
        outs.append(out)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename into place; the temp file is removed on failure."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise PgolfError(f"output directory does not exist: {parent}")
    if path.is_dir():
        raise PgolfError(f"output {path} is an existing directory; give a file path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise PgolfError(f"cannot write in {parent}: {e.strerror}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        # mkstemp creates 0600 files; give outputs the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))
