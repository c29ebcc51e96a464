"""Gather package functions, with everything they reference, into the source of one module.

Starting from entry points, every global name a definition uses is resolved in its own module:
package functions, classes and constants are taken with ``inspect.getsource`` / ``ast`` and
walked in turn; other modules and library objects become import lines. Intra-package imports
inside functions are resolved the same way and dropped; decorators that are package functions
(the scheme and correction registrations) are dropped; annotations are never followed (the
output starts with ``from __future__ import annotations``). Definitions come out dependencies
first, so class bases, decorators and constants exist before they are used.

Two hooks make this fit a decoder: ``tables`` (a package mapping → the keys to keep) is written
as a plain dict of just those entries, and ``substitutes`` (a package object → the package
function to carry in its place, under the original name) swaps out what cannot travel (a numba
kernel, a lazy loader). Two definitions wanting one name: the later one is renamed.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import sys
import types

from ..errors import PgolfError

PKG = __name__.split(".")[0]


class ExportError(PgolfError):
    """The decode code cannot be exported as it stands (a package module used as a value, …)."""


def _in_package(obj) -> bool:
    mod = getattr(obj, "__module__", None) or ""
    return mod == PKG or mod.startswith(PKG + ".")


def _module_globals(obj) -> dict:
    return vars(sys.modules[obj.__module__])


class _Names(ast.NodeVisitor):
    """Global-looking names a definition loads, annotations skipped."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and node.id not in self.names:
            self.names.append(node.id)

    def visit_arg(self, node: ast.arg) -> None:
        pass

    def _visit_fn(self, node) -> None:
        for d in node.decorator_list:
            self.visit(d)
        self.visit(node.args)
        for stmt in node.body:
            self.visit(stmt)

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_fn

    def visit_arguments(self, node: ast.arguments) -> None:
        for d in node.defaults + [d for d in node.kw_defaults if d is not None]:
            self.visit(d)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)


class _Rename(ast.NodeTransformer):
    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id in self.mapping:
            node.id = self.mapping[node.id]
        return node


def _decorator_root(d: ast.expr) -> str | None:
    while isinstance(d, (ast.Call, ast.Attribute)):
        d = d.func if isinstance(d, ast.Call) else d.value
    return d.id if isinstance(d, ast.Name) else None


def _resolve_relative(module: str, level: int, target: str | None) -> str:
    base = module.split(".")
    base = base[: len(base) - level]
    return ".".join(base + ([target] if target else []))


class Collector:
    def __init__(self, tables: dict[int, tuple[object, list[str]]] | None = None, substitutes: dict[int, object] | None = None):
        self.tables = tables or {}  # id(mapping) -> (mapping, keys kept)
        self.substitutes = substitutes or {}  # id(obj) -> replacement
        self.imports: list[str] = []
        self.blocks: list[str] = []
        self._by_name: dict[str, int] = {}  # emitted name -> id of what it holds
        self._name_of: dict[tuple[int, str], str] = {}  # (id, wanted name) -> emitted name
        self._stmt_names: dict[tuple[str, int], dict[str, str]] = {}
        self._active: set[int] = set()
        self._keep: list[object] = []  # keeps ids stable while collecting

    # -- public ---------------------------------------------------------------------------------

    def add(self, name: str, obj, where: str) -> str:
        """Make ``name`` (as module ``where`` sees it, bound to ``obj``) exist; returns the name
        it has in the output."""
        if id(obj) in self.substitutes:
            obj = self.substitutes[id(obj)]
        self._keep.append(obj)
        key = (id(obj), name)
        if key in self._name_of:
            return self._name_of[key]
        if isinstance(obj, types.ModuleType):
            if obj.__name__ == PKG or obj.__name__.startswith(PKG + "."):
                raise ExportError(f"{where} uses package module {obj.__name__} as a value ({name}); import the names it needs")
            line = f"import {obj.__name__}" if obj.__name__ == name else f"import {obj.__name__} as {name}"
            return self._import(key, name, line)
        if id(obj) in self.tables:
            return self._table(key, name, obj, where)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and _in_package(obj):
            return self._definition(key, name, obj)
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
            return self._library_object(key, name, obj, where)
        if callable(obj) and hasattr(obj, "__wrapped__") and _in_package(obj):
            return self._definition(key, name, obj)  # functools wrappers: their source is the def
        return self._constant(key, name, where)

    def source(self, header: str = "") -> str:
        head = "\n".join(p for p in [header, "from __future__ import annotations", *self.imports] if p)
        return "\n\n\n".join([head, *self.blocks]) + "\n"

    # -- kinds of names -------------------------------------------------------------------------

    def _claim(self, key: tuple[int, str], name: str) -> str:
        out, k = name, 1
        while out in self._by_name and self._by_name[out] != key[0]:
            k += 1
            out = f"{name}_{k}"
        self._by_name[out] = key[0]
        self._name_of[key] = out
        return out

    def _import(self, key, name: str, line: str) -> str:
        if name in self._by_name and self._by_name[name] != key[0]:
            raise ExportError(f"two different imports want the name {name}")
        self._claim(key, name)
        if line not in self.imports:
            self.imports.append(line)
        return name

    def _library_object(self, key, name: str, obj, where: str) -> str:
        mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        if mod == "builtins":
            return name
        line = _import_line(where, name)
        if line is not None:
            return self._import(key, name, line)
        if not mod or "." in qual or getattr(importlib.import_module(mod), qual, None) is not obj:
            raise ExportError(f"{where}: cannot tell where {name} ({obj!r}) is imported from")
        line = f"from {mod} import {qual}" + ("" if qual == name else f" as {name}")
        return self._import(key, name, line)

    def _table(self, key, name: str, mapping, where: str) -> str:
        _, keys = self.tables[id(mapping)]
        out = self._claim(key, name)
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise ExportError(f"{name} has no entry {missing[0]!r}")
        items = []
        for k in keys:
            v = mapping[k]
            if callable(v):
                items.append(f"{k!r}: {self.add(v.__name__, v, where)}")
            elif ast.literal_eval(repr(v)) == v:
                items.append(f"{k!r}: {v!r}")
            else:
                raise ExportError(f"{name}[{k!r}] is neither a function nor a literal")
        self.blocks.append(f"{out} = {{{', '.join(items)}}}")
        return out

    def _definition(self, key, name: str, obj) -> str:
        out = self._claim(key, name)
        if id(obj) in self._active:
            return out  # recursion (or mutual): the outer call emits it
        self._active.add(id(obj))
        inner = inspect.unwrap(obj)
        tree = ast.parse(inspect.getsource(inner).strip("\n") if not inspect.isclass(obj) else _dedent(inspect.getsource(obj)))
        node = tree.body[0]
        g = _module_globals(inner)
        self._strip(node, g, obj.__module__)
        renames = self._resolve(node, g, obj.__module__)
        node.name = out
        _Rename(renames).visit(node)
        self.blocks.append(ast.unparse(node))
        return out

    def _constant(self, key, name: str, where: str) -> str:
        line = _import_line(where, name)
        if line is not None:  # a library constant (``from concurrent.futures import FIRST_EXCEPTION``)
            return self._import(key, name, line)
        alias = _aliased_import(where, name)
        if alias is not None:  # ``from .x import A as B``: A under its own name, then B = A
            src, orig = alias
            got = self.add(orig, getattr(sys.modules[src], orig), src)
            out = self._claim(key, name)
            self.blocks.append(f"{out} = {got}")
            return out
        mod_name, stmt = _find_assignment(where, name)
        sid = (mod_name, stmt.lineno)
        if sid in self._stmt_names and name in self._stmt_names[sid]:
            return self._stmt_names[sid][name]
        g = vars(sys.modules[mod_name])
        targets = _targets(stmt)
        mapping = {t: self._claim((id(g.get(t)), t), t) for t in targets}
        self._stmt_names[sid] = mapping
        renames = self._resolve(stmt, g, mod_name, skip=set(targets))
        renames.update({t: o for t, o in mapping.items() if t != o})
        _Rename(renames).visit(stmt)
        self.blocks.append(ast.unparse(stmt))
        return mapping[name]

    # -- walking one definition -----------------------------------------------------------------

    def _strip(self, node, g: dict, module: str) -> None:
        """Drop package decorators and in-function package imports (resolving what they bind)."""
        for n in ast.walk(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                keep = []
                for d in n.decorator_list:
                    root = _decorator_root(d)
                    obj = g.get(root) if root else None
                    if obj is not None and _in_package(obj) and not isinstance(obj, types.ModuleType):
                        continue
                    if root and getattr(g.get(root), "__module__", "").startswith("numba"):
                        raise ExportError(f"{module}.{n.name} is a numba kernel; give it a numpy substitute")
                    keep.append(d)
                n.decorator_list = keep
            body = getattr(n, "body", None)
            if isinstance(body, list):
                new = []
                for stmt in body:
                    if isinstance(stmt, ast.ImportFrom) and (stmt.level or (stmt.module or "").startswith(PKG)):
                        src = _resolve_relative(module, stmt.level, stmt.module) if stmt.level else stmt.module
                        m = importlib.import_module(src)
                        for a in stmt.names:
                            obj = getattr(m, a.name)
                            got = self.add(a.asname or a.name, obj, src)
                            if got != (a.asname or a.name):
                                _Rename({a.asname or a.name: got}).visit(n)
                        continue
                    new.append(stmt)
                n.body = new or [ast.Pass()]

    def _resolve(self, node, g: dict, module: str, skip: set[str] = frozenset()) -> dict[str, str]:
        v = _Names()
        v.visit(node)
        renames = {}
        for name in v.names:
            if name in skip or name not in g:
                continue  # a local, or a builtin
            if name in vars(builtins) and g[name] is vars(builtins)[name]:
                continue
            got = self.add(name, g[name], module)
            if got != name:
                renames[name] = got
        return renames


def _dedent(src: str) -> str:
    lines = src.splitlines()
    pad = len(lines[0]) - len(lines[0].lstrip())
    return "\n".join(line[pad:] for line in lines)


def _targets(stmt) -> list[str]:
    out = []
    tgts = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    for t in tgts:
        for n in ast.walk(t):
            if isinstance(n, ast.Name):
                out.append(n.id)
    return out


def _find_assignment(module: str, name: str, depth: int = 0) -> tuple[str, ast.stmt]:
    """The top-level statement that first binds ``name`` in ``module`` (following imports)."""
    if depth > 8:
        raise ExportError(f"cannot find where {name} is defined")
    tree = ast.parse(inspect.getsource(sys.modules[module]))
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and name in _targets(stmt):
            if isinstance(stmt, ast.AnnAssign):
                if stmt.value is None:
                    continue
                stmt = ast.Assign(targets=[stmt.target], value=stmt.value, lineno=stmt.lineno)
            return module, stmt
        if isinstance(stmt, ast.ImportFrom):
            for a in stmt.names:
                if (a.asname or a.name) == name:
                    if a.asname and a.asname != a.name:
                        raise ExportError(f"{module} imports constant {a.name} as {a.asname}; import it under its own name")
                    src = _resolve_relative(module, stmt.level, stmt.module) if stmt.level else stmt.module
                    if not (src == PKG or src.startswith(PKG + ".")):
                        raise ExportError(f"{module}: {name} comes from library module {src}, import the module instead")
                    return _find_assignment(src, name, depth + 1)
    raise ExportError(f"cannot find a top-level assignment of {name} in {module}")


def _import_line(module: str, name: str) -> str | None:
    """The library import by which ``module`` binds ``name``, as one line (None: not found)."""
    for stmt in ast.parse(inspect.getsource(sys.modules[module])).body:
        if isinstance(stmt, ast.ImportFrom) and not stmt.level and stmt.module != "__future__":
            for a in stmt.names:
                if (a.asname or a.name) == name:
                    return ast.unparse(ast.ImportFrom(module=stmt.module, names=[a], level=0))
    return None


def _aliased_import(module: str, name: str) -> tuple[str, str] | None:
    """(source module, original name) when ``module`` binds ``name`` by a renaming package import."""
    for stmt in ast.parse(inspect.getsource(sys.modules[module])).body:
        if isinstance(stmt, ast.ImportFrom) and (stmt.level or (stmt.module or "").startswith(PKG)):
            for a in stmt.names:
                if a.asname == name and a.name != name:
                    src = _resolve_relative(module, stmt.level, stmt.module) if stmt.level else stmt.module
                    return src, a.name
    return None
