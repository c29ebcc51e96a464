"""Layers point one way: quantizers below the packer, searches and the API above both, CLI
commands independent of each other. Checked on the import statements (ast), including the
function-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pgolf_pack"

# Packages and modules that sit above quant/ (or run a model: calib/).
ABOVE_QUANT = ("pack", "calib", "analyze", "cli", "pipeline", "methods", "api", "rd_search", "verify")
ABOVE_PACK = ("calib", "analyze", "cli", "pipeline", "methods", "api", "rd_search", "verify")


def imports_in(source: str, package: list[str]) -> set[str]:
    """Absolute names of every module ``source`` (a module of ``package``) imports, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                out.add(node.module)
                continue
            base = ".".join(package[: len(package) - node.level + 1])
            # ``from .. import x`` may name a submodule, so count each name as one.
            out |= {f"{base}.{node.module}"} if node.module else {f"{base}.{a.name}" for a in node.names}
    return out


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(), list(path.relative_to(PKG.parent).with_suffix("").parts[:-1]))


def violations(sub: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    bad = {f"pgolf_pack.{f}" for f in forbidden}
    found = set()
    for path in sorted((PKG / sub).rglob("*.py")):
        for name in imports_of(path):
            if any(name == b or name.startswith(b + ".") for b in bad):
                found.add((str(path.relative_to(PKG)), name))
    return found


def test_quantizers_import_nothing_above_them():
    assert violations("quant", ABOVE_QUANT) == set()


def test_the_packer_imports_nothing_above_it():
    assert violations("pack", ABOVE_PACK) == set()


def test_the_symbol_coder_sits_below_quant_and_pack():
    # quant/ prices codes with it and pack/ registers it as a codec, so it may import neither.
    assert violations("coding", ("quant",) + ABOVE_QUANT) == set()


def test_the_scanner_resolves_relative_and_function_level_imports():
    src = ("from ..pack.packer import pack_model\nfrom . import base\nimport numpy\n"
           "def f():\n    from ..api import quantize\n    from .. import calib\n")
    assert imports_in(src, ["pgolf_pack", "quant"]) == {
        "pgolf_pack.pack.packer", "pgolf_pack.quant.base", "numpy", "pgolf_pack.api", "pgolf_pack.calib"}
    assert "pgolf_pack.pack.packer" in imports_of(PKG / "rd_search.py")


def test_no_cli_command_module_imports_another():
    cli = PKG / "cli"
    commands = {p.stem for p in cli.glob("*.py") if ".command(" in p.read_text()}
    assert {"core", "calib", "analyze"} <= commands
    for path in cli.glob("*.py"):
        if path.stem == "__init__":
            continue  # registers the commands by importing them
        others = {n.rsplit(".", 1)[-1] for n in imports_of(path) if n.startswith("pgolf_pack.cli.")} - {path.stem}
        assert not others & commands, f"{path.name} imports command module(s) {sorted(others & commands)}"
