"""Shrink Python the way the records ship code: minify, then a self-extracting wrapper.

One minifier for both things counted against the cap: the decoder ``export-decoder`` generates
and the user's own code that ``analyze budget --code`` counts.

Minifying works on the syntax tree only (``ast`` + ``ast.unparse``): docstrings and other bare
literal statements and comments go, indentation drops to one space a level. The generated
decoder also loses its annotations (a dataclass field keeps a one-word annotation: it is what
makes it a field); user code keeps them, since a program may read its own annotations (typer,
pydantic, dataclasses). Names are left alone: renaming is where minifiers break code, and the
compressor below takes most of what renaming would save, so the figures are an upper bound on
what the records' more aggressive minifiers give.

The wrapper is a two-line Python file that decompresses the minified code and runs it in its own
module namespace. The compressed bytes sit in a latin-1 string literal (declared by a coding
line), which costs about 2% for the escaped characters against 25% for base85.
"""

from __future__ import annotations

import ast
import lzma

import brotli

from ..errors import PgolfError

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


class _Strip(ast.NodeTransformer):
    def __init__(self, keep_annotations: bool = False) -> None:
        self._class_depth = 0
        self._keep = keep_annotations

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        # Bare literal statements (docstrings among them) do nothing when run. A body left empty
        # gets a ``pass``, and so does an emptied ``finally`` (a ``try`` may need it to stand);
        # an emptied ``else`` goes.
        for attr in ("body", "orelse", "finalbody"):
            body = getattr(node, attr, None)
            if isinstance(body, list) and all(isinstance(x, ast.stmt) for x in body):
                kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
                needed = attr == "body" or (attr == "finalbody" and body)
                setattr(node, attr, kept or ([ast.Pass()] if needed else []))
        return node

    def _fn(self, node):
        if self._keep:
            return self.generic_visit(node)
        node.returns = None
        for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]:
            if a is not None:
                a.annotation = None
        depth, self._class_depth = self._class_depth, 0
        self.generic_visit(node)
        self._class_depth = depth
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _fn

    def visit_ClassDef(self, node: ast.ClassDef):
        self._class_depth += 1
        self.generic_visit(node)
        self._class_depth -= 1
        return node

    def visit_Module(self, node: ast.Module):
        self.generic_visit(node)
        if not self._keep:  # with annotations gone, postponing their evaluation is moot
            node.body = [s for s in node.body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign):
        if self._keep:
            return self.generic_visit(node)
        if self._class_depth:
            node.annotation = ast.Name("int", ast.Load())
            return node
        if node.value is None:
            return None  # a bare annotation in a function body binds nothing
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno), node)


def minify(source: str, keep_annotations: bool = False) -> str:
    """Semantically equal, smaller source (see the module docstring); PgolfError if not Python."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise PgolfError(f"cannot minify: not valid Python ({e.msg}, line {e.lineno})") from None
    tree = ast.fix_missing_locations(_Strip(keep_annotations).visit(tree))
    full = ast.unparse(tree)
    out = []
    for line in full.splitlines():
        body = line.lstrip(" ")
        out.append(" " * ((len(line) - len(body)) // 4) + body)
    small = "\n".join(out) + "\n"
    # ast.unparse writes no multi-line literals once docstrings are gone, so leading spaces are
    # indentation only; should that ever not hold, the re-indented text parses differently and
    # the four-space form is kept.
    try:
        if ast.dump(ast.parse(small)) == ast.dump(ast.parse(full)):
            return small
    except SyntaxError:
        pass
    return full + "\n"


_ESCAPES = {10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}
_OCTAL = b"01234567"


def _latin1_literal(data: bytes) -> str:
    out = []
    for i, b in enumerate(data):
        if b == 0:
            # "\0" before an octal digit would read as a longer escape.
            out.append("\\x00" if i + 1 < len(data) and data[i + 1] in _OCTAL else "\\0")
        else:
            out.append(_ESCAPES.get(b, chr(b)))
    return '"' + "".join(out) + '"'


_STMTS = {
    "lzma": 'import lzma as z;exec(z.decompress({lit}.encode("l1"),z.FORMAT_RAW,None,[{{"id":z.FILTER_LZMA2}}]))',
    "brotli": 'import brotli as z;exec(z.decompress({lit}.encode("l1")))',
}


def wrappers(code: str) -> dict[str, bytes]:
    """Each compressor's self-extracting Python file that runs ``code``."""
    raw = code.encode()
    blobs = {"lzma": lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
             "brotli": brotli.compress(raw, quality=11, lgwin=24)}
    return {name: ("#coding:l1\n" + _STMTS[name].format(lit=_latin1_literal(b)) + "\n").encode("latin-1")
            for name, b in blobs.items()}


def wrap(code: str) -> tuple[bytes, str]:
    """The smallest self-extracting Python file that runs ``code``; returns (file bytes, compressor)."""
    name, data = min(wrappers(code).items(), key=lambda kv: len(kv[1]))  # a tie keeps lzma
    return data, name


def unwrap(data: bytes) -> str:
    """The code a :func:`wrappers` file runs (proves a counted wrapper decodes to its code)."""
    try:
        tree = ast.parse(data.decode("latin-1").split("\n", 1)[1])
        lit = next(n.func.value.value for n in ast.walk(tree) if isinstance(n, ast.Call)
                   and isinstance(n.func, ast.Attribute) and n.func.attr == "encode"
                   and isinstance(n.func.value, ast.Constant) and isinstance(n.func.value.value, str))
        packed = lit.encode("latin-1")
        if data.split(b"\n", 2)[1].startswith(b"import lzma"):
            return lzma.decompress(packed, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()
        return brotli.decompress(packed).decode()
    except (SyntaxError, StopIteration, IndexError, UnicodeError, lzma.LZMAError, brotli.error) as e:
        raise PgolfError(f"not a pgolf-pack code wrapper ({e})") from None
