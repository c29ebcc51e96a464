"""The ``pgolf-pack`` command line: a thin layer over the Python API."""

from __future__ import annotations

import sys

from .app import app
from . import calib, core  # noqa: F401  (registers commands)
from . import analyze, rd  # noqa: F401  (registers the analyze commands)
from . import sensitivity  # noqa: F401
from . import ship  # noqa: F401


def main() -> None:
    app()


__all__ = ["app", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
