"""Every third-party module the package imports is declared in pyproject.toml.

CI machines carry packages the project never declared; this keeps a fresh install honest.
"""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_modules(pkg: Path) -> dict[str, str]:
    """Top-level module name -> first file (relative to the package's parent) importing it."""
    found: dict[str, str] = {}
    for path in sorted(pkg.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(pkg.parent)))
    return found


def _declared_distributions(extras: tuple[str, ...] = ()) -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = list(meta["project"]["dependencies"])
    for extra in extras:
        deps += meta["project"]["optional-dependencies"][extra]
    return {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def _undeclared(tree: Path, declared: set[str]) -> list[str]:
    dist_of = packages_distributions()
    missing = []
    for mod, where in _imported_top_modules(tree).items():
        if mod in sys.stdlib_module_names or mod in ("pgolf_pack", "tomli", "conftest"):
            continue
        dists = {d.lower().replace("_", "-") for d in dist_of.get(mod, [mod])}
        if not dists & declared:
            missing.append(f"{mod} (imported in {where}; distributions {sorted(dists)})")
    return missing


def test_every_third_party_import_of_the_package_is_declared():
    missing = _undeclared(ROOT / "pgolf_pack", _declared_distributions())
    assert not missing, "undeclared third-party imports: " + "; ".join(missing)


def test_every_third_party_import_of_the_tests_is_in_dev():
    missing = _undeclared(ROOT / "tests", _declared_distributions(("dev",)))
    assert not missing, "test imports missing from the dev extra: " + "; ".join(missing)


def test_scanner_sees_imports(tmp_path):
    # The scan must notice a nested third-party import, or the test above proves nothing.
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "m.py").write_text("def f():\n    import scipy.linalg\nfrom . import x\n")
    found = _imported_top_modules(pkg)
    assert found["scipy"] == "p/sub/m.py"

