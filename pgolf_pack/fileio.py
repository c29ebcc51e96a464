"""Atomic writes: outputs appear complete or not at all, and inputs are never overwritten."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import PgolfError


def check_not_input(out: Path, *inputs: Path | None) -> None:
    for inp in inputs:
        if inp is None:
            continue
        try:
            if Path(out).resolve() == Path(inp).resolve():
                raise PgolfError(f"refusing to overwrite the input file {inp}; choose another output path")
        except OSError:
            continue


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename into place; the temp file is removed on failure."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise PgolfError(f"output directory does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
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
