"""The manifest schema: an artifact's manifest is validated in full before any payload is touched.

An artifact can carry valid checksums and still lie: a shape the streams do not fill (dequantizers
broadcast), a group that would decode to gigabytes, offsets outside the file, two tensors with one
name. Everything the decoders will trust is checked here first, from the manifest alone:

* types, keys and ranges of every field, JSON nesting depth;
* each tensor's streams and parameters imply exactly its shape (the scheme's registered check,
  :func:`..quant.base.check_spec`), with bounded parameters;
* every stream sits where the packer would have put it (group name, position), so each group and
  stream is referenced exactly once and no two tensors can trade streams unnoticed;
* per group: raw_bytes is the sum of its streams' bytes, its symbol range spans theirs, and the
  payloads tile the payload area exactly;
* the bytes decoding will allocate (every stream plus every tensor as float32) stay under a
  ceiling: ``max_decoded_bytes`` when given, else the environment variable
  ``PGOLF_MAX_DECODED_BYTES``, else :data:`DEFAULT_MAX_DECODED_BYTES`.

Each failure is one :class:`ArtifactError` line naming the tensor or group.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..checkpoint import DTYPE_NAMES
from ..errors import ArtifactError, PgolfError
from ..quant.base import check_spec
from ..quant.spec import INT_DTYPES, SIDE_DTYPES, StreamSpec, TensorSpec

from .container import FORMAT_VERSION as MANIFEST_FORMAT  # noqa: E402  (one version for header and manifest)
GROUPINGS = ("role", "tensor", "single")
# A 17M-parameter model's manifest is ~40 KB; this leaves room for models with thousands of tensors.
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 32
MAX_NAME = 4096
MAX_NDIM = 8
MAX_DIM = 1 << 40
SYMBOL_BOUND = 1 << 31
# A model that fits Parameter Golf's 16 MB decodes to a few hundred MB (float32 tensors plus
# their symbols); 4 GiB leaves room for larger models and still refuses a bomb outright.
DEFAULT_MAX_DECODED_BYTES = 4 << 30
ENV_MAX_DECODED = "PGOLF_MAX_DECODED_BYTES"

_TOP_KEYS = {"format", "grouping", "tensors", "groups", "meta"}
_TENSOR_KEYS = {"name", "shape", "dtype", "scheme", "params", "streams"}
_STREAM_KEYS = {"group", "index", "shape", "dtype", "kind", "lo", "hi"}
_GROUP_KEYS = {"name", "kind", "lo", "hi", "raw_bytes", "raw_crc32", "codec", "codec_params", "offset", "length",
               "payload_crc32"}


def decoded_limit(max_decoded_bytes: int | None = None) -> int:
    """The ceiling on decoded bytes: the argument, else $PGOLF_MAX_DECODED_BYTES, else the default."""
    if max_decoded_bytes is not None:
        if isinstance(max_decoded_bytes, bool) or not isinstance(max_decoded_bytes, int) or max_decoded_bytes < 1:
            raise PgolfError(f"max_decoded_bytes must be a positive integer, got {max_decoded_bytes!r}")
        return max_decoded_bytes
    env = os.environ.get(ENV_MAX_DECODED, "").strip()
    if not env:
        return DEFAULT_MAX_DECODED_BYTES
    try:
        value = int(env)
    except ValueError:
        value = 0
    if value < 1:
        raise PgolfError(f"{ENV_MAX_DECODED} must be a positive number of bytes, got {env!r}")
    return value


# --- decompressing and parsing ---------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _finite(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return v


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


def parse_manifest(compressed: bytes) -> dict:
    """Brotli-decompress (at most :data:`MAX_MANIFEST_BYTES`) and parse the manifest JSON strictly:
    no NaN/Infinity, no duplicate keys, no nesting deeper than :data:`MAX_DEPTH`."""
    from .codecs import decompress

    try:
        # The codec's bounded decoder: a bomb stops at the limit instead of inflating whole.
        text = decompress("brotli", compressed, MAX_MANIFEST_BYTES)
    except ArtifactError as e:
        if "inflates past" in str(e):
            raise ArtifactError(f"artifact manifest decompresses to more than {MAX_MANIFEST_BYTES:,} bytes") from None
        raise ArtifactError(f"artifact manifest cannot be decoded: {e}") from None
    try:
        manifest = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ArtifactError(f"artifact manifest nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"artifact manifest is not valid JSON: {str(e)[:120]}") from None
    _check_depth(manifest)
    return manifest


def _check_depth(obj: object) -> None:
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ArtifactError(f"artifact manifest nests deeper than {MAX_DEPTH} levels")
        if isinstance(o, dict):
            stack.extend((v, depth + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, depth + 1) for v in o)


# --- field checks ----------------------------------------------------------------------------------


def _fail(where: str, msg: str):
    raise ArtifactError(f"artifact manifest: {where}: {msg}")


def _obj(v: object, where: str, keys: set[str]) -> dict:
    if not isinstance(v, dict):
        _fail(where, f"expected an object, got {type(v).__name__}")
    missing, extra = sorted(keys - set(v)), sorted(set(v) - keys)
    if missing:
        _fail(where, f"missing {missing[0]!r}")
    if extra:
        _fail(where, f"unknown field {extra[0][:40]!r}")
    return v


def _int(v: object, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(where, f"expected an integer in {lo}..{hi}, got {_short(v)}")
    return v


def _str(v: object, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        _fail(where, f"expected a non-empty string, got {_short(v)}")
    if choices is not None and v not in choices:
        _fail(where, f"{v[:60]!r} is not one of {', '.join(choices)}")
    return v


def _shape(v: object, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        _fail(where, f"expected a list of at most {MAX_NDIM} sizes, got {_short(v)}")
    return tuple(_int(x, where, 0, MAX_DIM) for x in v)


def _short(v: object) -> str:
    text = json.dumps(v) if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _takes(codec: str) -> str:
    """What ``codec`` codes: "symbols" (arrays; symbol groups only) or "bytes"."""
    from . import codecs

    # The codec table names it; the entropy coder may predate its entry there.
    return getattr(codecs.CODECS.get(codec), "takes", "symbols" if codec == "entropy" else "bytes")


def _codecs_for(kind: str) -> tuple[str, ...]:
    from . import codecs

    names = tuple(codecs.CODECS) + (() if "entropy" in codecs.CODECS else ("entropy",))
    return names if kind == "symbols" else tuple(c for c in names if _takes(c) == "bytes")


def _descriptor_fields(codec: str, kind: str) -> set[str]:
    """The fields a group's descriptor adds for its codec: what the codec records for a re-pack
    (the entropy coder's model), a byte layout for symbols, the shuffle flag for side bytes."""
    from . import codecs

    records = getattr(codecs.CODECS.get(codec), "records", ("model",) if codec == "entropy" else ())
    if kind == "side":
        return {"shuffle", *records}
    return {*records, *(("layout",) if _takes(codec) == "bytes" else ())}


def _entropy_models() -> tuple[str, ...]:
    from ..coding.entropy_decode import MODELS

    return tuple(MODELS)


def _check_group(i: int, g: object) -> dict:
    where = f"group {i}"
    if isinstance(g, dict) and isinstance(g.get("name"), str):
        where = f"group {i} ({g['name'][:80]})"
    if not isinstance(g, dict):
        _fail(where, f"expected an object, got {type(g).__name__}")
    kind = _str(g.get("kind"), f"{where}.kind", ("symbols", "side"))
    codec = _str(g.get("codec"), f"{where}.codec", _codecs_for(kind))
    extra = _descriptor_fields(codec, kind)
    _obj(g, where, _GROUP_KEYS | extra)
    _str(g["name"], f"{where}.name")
    lo = _int(g["lo"], f"{where}.lo", -SYMBOL_BOUND, SYMBOL_BOUND)
    _int(g["hi"], f"{where}.hi", lo, SYMBOL_BOUND)
    for k in ("raw_crc32", "payload_crc32"):
        _int(g[k], f"{where}.{k}", 0, 0xFFFFFFFF)
    for k in ("raw_bytes", "offset", "length"):
        _int(g[k], f"{where}.{k}", 0, 1 << 62)
    if not isinstance(g["codec_params"], dict):
        _fail(where, "codec_params must be an object")
    if codec == "entropy" and "model" in extra:
        _str(g["model"], f"{where}.model", _entropy_models())
    if "layout" in extra:
        from .layout import Layout

        try:
            Layout.from_dict(g["layout"])
        except ArtifactError as e:
            _fail(where, str(e))
    if "shuffle" in extra and not isinstance(g["shuffle"], bool):
        _fail(where, f"shuffle must be true or false, got {_short(g['shuffle'])}")
    return g


def _check_stream(where: str, s: object, ngroups: int) -> StreamSpec:
    _obj(s, where, _STREAM_KEYS)
    assert isinstance(s, dict)
    _int(s["group"], f"{where}.group", 0, ngroups - 1)
    _int(s["index"], f"{where}.index", 0, 1 << 62)
    kind = _str(s["kind"], f"{where}.kind", ("symbols", "side"))
    dtype = _str(s["dtype"], f"{where}.dtype", INT_DTYPES if kind == "symbols" else SIDE_DTYPES)
    lo = _int(s["lo"], f"{where}.lo", -SYMBOL_BOUND, SYMBOL_BOUND)
    hi = _int(s["hi"], f"{where}.hi", lo, SYMBOL_BOUND)
    return StreamSpec(_shape(s["shape"], f"{where}.shape"), dtype, kind, lo, hi)


def _check_tensor(i: int, t: object, ngroups: int) -> TensorSpec:
    where = f"tensor {i}"
    if isinstance(t, dict) and isinstance(t.get("name"), str):
        where = f"tensor {t['name'][:120]}"
    _obj(t, where, _TENSOR_KEYS)
    assert isinstance(t, dict)
    name = _str(t["name"], f"{where}.name")
    shape = _shape(t["shape"], f"{where}.shape")
    dtype = _str(t["dtype"], f"{where}.dtype", tuple(DTYPE_NAMES.values()))
    scheme = _str(t["scheme"], f"{where}.scheme")
    params = t["params"]
    if not isinstance(params, dict):
        _fail(where, f"params must be an object, got {type(params).__name__}")
    if "group" in params:
        _str(params["group"], f"{where}.params.group")
    streams = t["streams"]
    if not isinstance(streams, dict) or not streams:
        _fail(where, "streams must be a non-empty object")
    specs = {}
    for sname, s in streams.items():
        _str(sname, f"{where}: stream name")
        specs[sname] = _check_stream(f"{where}.streams.{sname[:60]}", s, ngroups)
    return TensorSpec(name, shape, dtype, scheme, params, specs)


# --- where the packer puts each stream -------------------------------------------------------------


def group_key(tensor: str, params: dict, stream: str, s: StreamSpec, grouping: str) -> str:
    """The group a stream belongs in, as :func:`.packer.build_groups` names it."""
    from .packer import group_name

    return group_name(tensor, params, stream, s.kind, np.dtype(s.dtype), grouping)


def _canonical_groups(specs: list[TensorSpec], grouping: str) -> dict[str, list[tuple[int, str]]]:
    """Group name → members (tensor index, stream name) in packing order: symbols groups in order
    of first appearance, then side groups; members by tensor, streams by name."""
    sym: dict[str, list[tuple[int, str]]] = {}
    side: dict[str, list[tuple[int, str]]] = {}
    for ti, t in enumerate(specs):
        for sname in sorted(t.streams):
            s = t.streams[sname]
            (sym if s.kind == "symbols" else side).setdefault(group_key(t.name, t.params, sname, s, grouping), []).append((ti, sname))
    return {**sym, **side}


# --- the whole manifest ----------------------------------------------------------------------------


def validate_manifest(manifest: object, payload_bytes: int, max_decoded_bytes: int | None = None) -> None:
    """Raise :class:`ArtifactError` unless ``manifest`` is exactly what the packer writes for some
    model whose decoding stays under the decoded-bytes ceiling (see the module docstring)."""
    limit = decoded_limit(max_decoded_bytes)
    _check_depth(manifest)
    m = _obj(manifest, "top level", _TOP_KEYS)
    if type(m["format"]) is not int or m["format"] != MANIFEST_FORMAT:
        _fail("format", f"manifest format {_short(m['format'])} is not supported (this pgolf-pack reads {MANIFEST_FORMAT})")
    grouping = _str(m["grouping"], "grouping", GROUPINGS)
    if not isinstance(m["meta"], dict):
        _fail("meta", "expected an object")
    groups, tensors = m["groups"], m["tensors"]
    if not isinstance(groups, list) or not isinstance(tensors, list):
        _fail("top level", "tensors and groups must be lists")
    if not tensors:
        _fail("tensors", "the artifact holds no tensors")

    offset = 0
    for i, g in enumerate(groups):
        _check_group(i, g)
        if g["offset"] != offset:
            _fail(f"group {g['name'][:80]}", f"payload at offset {g['offset']}, expected {offset} (payloads are contiguous)")
        offset += g["length"]
        if offset > payload_bytes:
            raise ArtifactError(f"artifact is truncated: group {g['name'][:80]} is incomplete "
                                f"({offset - payload_bytes} bytes missing)")
    if offset < payload_bytes:
        raise ArtifactError(f"artifact has {payload_bytes - offset} unexpected trailing bytes")

    specs = [_check_tensor(i, t, len(groups)) for i, t in enumerate(tensors)]
    names: set[str] = set()
    decoded = 0
    for t in specs:
        if t.name in names:
            _fail(f"tensor {t.name[:120]}", "name is used twice")
        names.add(t.name)
        decoded += 4 * t.numel + sum(s.nbytes for s in t.streams.values())
    if decoded > limit:
        raise ArtifactError(f"artifact would decode to {decoded:,} bytes, over the limit of {limit:,} "
                            f"(raise it with {ENV_MAX_DECODED} if this model is real)")
    for t in specs:
        check_spec(t)

    canon = _canonical_groups(specs, grouping)
    got = [g["name"] for g in groups]
    if got != list(canon):
        wrong = next((i for i, (a, b) in enumerate(zip(got, canon)) if a != b), min(len(got), len(canon)))
        have = f"group {wrong} is {got[wrong][:80]!r}" if wrong < len(got) else f"only {len(got)} groups"
        want = f"{list(canon)[wrong][:80]!r}" if wrong < len(canon) else "no such group"
        _fail("groups", f"{have}; the tensors' streams make it {want}")
    for gi, (gname, members) in enumerate(canon.items()):
        g = groups[gi]
        where = f"group {gname[:80]}"
        raw = 0
        for pos, (ti, sname) in enumerate(members):
            ref = tensors[ti]["streams"][sname]
            if (ref["group"], ref["index"]) != (gi, pos):
                _fail(f"tensor {specs[ti].name[:120]}", f"stream {sname} points at group {ref['group']} position "
                      f"{ref['index']}, the packer puts it at group {gi} position {pos}")
            raw += specs[ti].streams[sname].nbytes
        kinds = {specs[ti].streams[s].kind for ti, s in members}
        if kinds != {g["kind"]}:
            _fail(where, f"a {g['kind']} group holding {'/'.join(sorted(kinds))} streams")
        if g["raw_bytes"] != raw:
            _fail(where, f"raw_bytes is {g['raw_bytes']}, its streams hold {raw}")
        lo = min(specs[ti].streams[s].lo for ti, s in members)
        hi = max(specs[ti].streams[s].hi for ti, s in members)
        if (g["lo"], g["hi"]) != (lo, hi):
            _fail(where, f"symbol range [{g['lo']}, {g['hi']}] is not its streams' [{lo}, {hi}]")
