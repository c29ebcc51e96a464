"""Child process of tests/test_hostile_artifacts.py: runs every crafted artifact through the API and
the CLI under the address-space limit the parent set, and reports what happened as JSON.

One process for the whole corpus keeps the test quick (torch is imported once); the peak RSS is
sampled around each case so a decoder that inflates a bomb before refusing it shows up even
when it stays under the limit.

Usage: python hostile_runner.py CASES.json RESULT.json
"""

from __future__ import annotations

import json
import resource
import sys
import traceback
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_peak_mb() -> float | None:
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmPeak:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def _api(path: str) -> str:
    from pgolf_pack.errors import PgolfError
    from pgolf_pack.pack.packer import unpack_model
    from pgolf_pack.verify import dequantize_model

    try:
        qm, _ = unpack_model(Path(path).read_bytes())
        dequantize_model(qm)
    except PgolfError as e:
        return f"{type(e).__name__}: {e}"
    except BaseException as e:  # noqa: BLE001  (what the parent must see is exactly what escaped)
        return f"UNEXPECTED {type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-600:]}"
    return "ok"


def _cli(args: list[str]) -> dict:
    from typer.testing import CliRunner

    from pgolf_pack.cli import app

    r = CliRunner().invoke(app, args)
    exc = r.exception
    return {"exit": r.exit_code, "output": r.output,
            "exception": None if exc is None or isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"}


def main(cases_path: str, out_path: str) -> None:
    cases = json.loads(Path(cases_path).read_text())
    results = []
    for case in cases:
        before = _rss_mb()
        res = {"name": case["name"], "api": _api(case["path"]), "cli": {}}
        out = Path(case["path"]).with_suffix(".safetensors")
        for cmd in case["commands"]:
            args = {"unpack": ["unpack", case["path"], "-o", str(out)],
                    "verify-roundtrip": ["verify-roundtrip", case["path"]],
                    "inspect": ["inspect", case["path"]]}[cmd]
            res["cli"][cmd] = _cli(args)
        res["wrote_output"] = out.exists()
        res["rss_growth_mb"] = _rss_mb() - before
        res["rss_mb"], res["vm_peak_mb"] = _rss_mb(), _vm_peak_mb()
        results.append(res)
        Path(out_path).write_text(json.dumps(results))  # partial results survive a crash
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
