"""The ``pgolf-pack`` command line: a thin layer over the Python API."""

from __future__ import annotations

import sys

# Ctrl-C while the commands import (torch takes seconds) ends like any other interrupt: one line, 130.
try:
    from .app import app
    from . import calib, core  # noqa: F401  (registers commands)
    from . import analyze, rd  # noqa: F401  (registers the analyze commands)
    from . import sensitivity  # noqa: F401
    from . import ship  # noqa: F401
except KeyboardInterrupt:
    sys.stderr.write("error: interrupted\n")
    raise SystemExit(130) from None


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)


__all__ = ["app", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
