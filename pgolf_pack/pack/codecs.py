"""Every codec behind one registry: a codec is one :class:`Codec` registered in ``CODECS``.

The packer only iterates the registry; adding a codec is one registration. Byte codecs are also
reachable as ``compress(name, data)`` / ``decompress(name, data, max_out)``. Settings are fixed
per codec name, so the name plus :func:`codec_params` (recorded in the manifest) says exactly how a
payload was made. Decoding is bounded: no codec writes more than the output size the manifest
implies before it fails. Every codec is deterministic and round-trips empty input.

``lrzip`` runs the real binary on files in a private temp dir. It always gets ``-T``: without it
lrzip tests each block with LZ4 and silently stores LZ4-incompressible blocks raw, which fine-step
int6/int8 symbols are (see DESIGN.md). ``LRZIP=NOCONFIG`` keeps a user's lrzip.conf out of it.
Output was byte-identical across repeated runs and across ``-p 1/2/4`` and ``-m`` (lrzip 0.651,
0.4 MB and 3 MB of int6 symbols), so thread count and RAM do not leak into the artifact.
"""

from __future__ import annotations

import functools
import lzma
import os
import shutil
import subprocess
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import brotli
import zstandard

from ..errors import ArtifactError, PgolfError

LRZIP_MISSING = "lrzip binary not found on PATH; install it (apt-get install lrzip) or pick another codec"
# ZPAQ runs ~20-170 s per 4 MB on two busy cores; an hour only catches a hung process.
LRZIP_TIMEOUT_S = 3600
BROTLI_QUALITY = 11
BROTLI_LGWIN = 24
ZSTD_LEVEL = 22
# 128 MiB covers any group of a 16 MB artifact; zstd still shrinks the window for small inputs.
ZSTD_WINDOW_LOG = 27
LZMA_PRESET = 9 | lzma.PRESET_EXTREME
# Preset 9's 64 MiB dictionary is what the decoder allocates; a header claiming a larger one
# (up to 4 GiB) is refused instead of allocated.
LZMA_MEMLIMIT = 1 << 27
LRZIP_ZPAQ_ARGS = ("-z", "-L", "9", "-T")
LRZIP_LZMA_ARGS = ("-L", "9", "-T")


@dataclass(frozen=True)
class Codec:
    """One registered codec: everything the packer needs to know about it.

    ``takes`` is ``"bytes"`` (the group after its byte layout, or a side group's raw bytes):
    ``encode(data) -> payload`` and ``decode(payload, max_out) -> data``, where ``decode`` stops
    and raises :class:`ArtifactError` as soon as the output would pass ``max_out`` bytes. Or it
    is ``"symbols"`` (the group's integer arrays; symbol groups only):
    ``encode(arrays, lo, hi, desc) -> (payload, extras)``, ``extras`` being the descriptor fields
    listed in ``records`` (what a re-pack must replay), and
    ``decode(payload, shapes, dtypes, lo, hi, desc) -> arrays``, the shapes bounding the output.
    """

    name: str
    takes: str
    encode: Callable
    decode: Callable
    params: Callable[[], dict]  # the manifest's ``codec_params``: exact settings and versions
    available: Callable[[], bool]
    auto: bool = False  # ``--codec auto`` tries it on symbol groups
    auto_fast: bool = False  # ``auto-fast`` tries it (on side groups too, when it takes bytes)
    records: tuple[str, ...] = ()
    missing: str = ""  # the one-line error when it is not available here


# --- library codecs --------------------------------------------------------------------------------


def _too_big(codec: str, max_out: int) -> ArtifactError:
    return ArtifactError(f"{codec} payload inflates past the {max_out} bytes its manifest entry allows")


def _brotli_compress(data: bytes) -> bytes:
    return brotli.compress(data, mode=brotli.MODE_GENERIC, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)


_BROTLI_STEP = 1 << 20


def _brotli_decompress(data: bytes, max_out: int) -> bytes:
    # process() with an output limit hands back at most about that much per call; steps of at
    # most a MiB stop a bomb after max_out + one step, never inflated whole or in one allocation.
    d = brotli.Decompressor()
    out, total = [], 0
    step = min(max_out + 1, _BROTLI_STEP)
    try:
        chunk = d.process(data, output_buffer_limit=step)
        while True:
            out.append(chunk)
            total += len(chunk)
            if total > max_out:
                raise _too_big("brotli", max_out)
            if d.is_finished():
                break
            # can_accept_more_data() is true even with output pending, so drain until a call
            # yields nothing: then the input is used up and the stream has not ended.
            chunk = d.process(b"", output_buffer_limit=min(max_out + 1 - total, _BROTLI_STEP))
            if not chunk:
                break
    except brotli.error as e:
        raise ArtifactError(f"brotli payload is corrupted or truncated ({e})") from None
    if not d.is_finished():
        raise ArtifactError("brotli payload is corrupted or truncated (stream does not end)")
    return b"".join(out)


def _zstd_compress(data: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, source_size=len(data), window_log=ZSTD_WINDOW_LOG, write_content_size=1, write_checksum=0
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


_ZSTD_CHUNK = 1 << 20


def _zstd_decompress(data: bytes, max_out: int) -> bytes:
    try:
        size = zstandard.frame_content_size(data)
        if size < 0:
            raise ArtifactError("zstd payload is corrupted (bad content size in frame header)")
        if size > max_out:
            raise _too_big("zstd", max_out)
        out, total = [], 0
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << ZSTD_WINDOW_LOG)
        with dctx.stream_reader(data) as reader:
            while True:
                chunk = reader.read(min(_ZSTD_CHUNK, max_out + 1 - total))
                if not chunk:
                    break
                out.append(chunk)
                total += len(chunk)
                if total > max_out:
                    raise _too_big("zstd", max_out)
    except zstandard.ZstdError as e:
        raise ArtifactError(f"zstd payload is corrupted or truncated ({e})") from None
    if total != size:
        raise ArtifactError(f"zstd payload is corrupted or truncated ({total} bytes decoded, frame says {size})")
    return b"".join(out)


def _lzma_compress(data: bytes) -> bytes:
    # .lzma ("alone") framing: 13 header bytes against ~60 of .xz framing, same LZMA coding.
    return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=LZMA_PRESET)


def _lzma_decompress(data: bytes, max_out: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT)
    try:
        out = d.decompress(data, max_length=max_out + 1)
    except (lzma.LZMAError, EOFError) as e:
        raise ArtifactError(f"lzma payload is corrupted or truncated ({e})") from None
    if len(out) > max_out:
        raise _too_big("lzma", max_out)
    if not d.eof:
        raise ArtifactError("lzma payload is corrupted or truncated (stream does not end)")
    if d.unused_data:
        raise ArtifactError(f"lzma payload has {len(d.unused_data)} trailing bytes")
    return out


def _raw_decompress(data: bytes, max_out: int) -> bytes:
    if len(data) > max_out:
        raise _too_big("raw", max_out)
    return bytes(data)


# --- lrzip (external binary) -----------------------------------------------------------------------


def _lrzip_path() -> str:
    path = shutil.which("lrzip")
    if path is None:
        raise PgolfError(LRZIP_MISSING)
    return path


@functools.lru_cache(maxsize=8)
def _lrzip_version(path: str) -> str:
    try:
        r = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (r.stdout + r.stderr).strip()
    return text.split()[-1] if text else "unknown"


# lrzip's chatter that says nothing about why it failed.
_LRZIP_NOISE = (
    "Output filename is",
    "Decompressing",
    "Average DeCompression Speed",
    "Compression Ratio",
    "Total time",
    "Warning, low memory",
    "Stored:",
    "Output file:",
    "Success",
)


def _summarize(stderr: str, stdout: str) -> str:
    lines = []
    for line in (stderr + "\n" + stdout).replace("Fatal error - exiting", "\n").splitlines():
        line = line.strip()
        if line and not line.startswith(_LRZIP_NOISE) and line not in lines:
            lines.append(line)
    text = "; ".join(lines[:3]) or "no message"
    return text if len(text) <= 200 else text[:197] + "..."


# An lrzip 0.6 file: b"LRZI", major, minor, then the decoded size as a little-endian u64.
_LRZ_MAGIC = b"LRZI"
_LRZIP_POLL_S = 0.05


def _lrz_claimed_size(data: bytes) -> int | None:
    if len(data) >= 14 and data[:4] == _LRZ_MAGIC and data[4] == 0:
        return int.from_bytes(data[6:14], "little")
    return None


# Every lrzip this process runs, so an interrupted pack can stop those of the other worker threads.
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def kill_running() -> None:
    """Kill every lrzip process group this process is running.

    For the thread that sees an interrupt or a failed group: the other worker threads' lrzip
    would otherwise run to its end (minutes with ZPAQ). Each killed run then fails in its own
    thread with an ArtifactError and removes its temp dir.
    """
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run_lrzip(args: tuple[str, ...], data: bytes, action: str, max_out: int | None = None) -> bytes:
    """Run lrzip on ``data`` in a private temp dir; ``max_out`` bounds what decompression may write."""
    exe = _lrzip_path()
    if max_out is not None:
        claimed = _lrz_claimed_size(data)
        if claimed is not None and claimed > max_out:
            raise _too_big("lrzip", max_out)
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-", ignore_cleanup_errors=True) as tmp:
        # lrzip wants the .lrz suffix on what it decompresses.
        src = Path(tmp) / ("payload.lrz" if action == "decompress" else "payload")
        dst = Path(tmp) / "out"
        src.write_bytes(data)
        env = {**os.environ, "LRZIP": "NOCONFIG", "TMPDIR": tmp, "TMP": tmp}
        # Its own session (so its own process group): an interrupt meant for us does not reach
        # it half-way, and on any way out of here the whole group is killed before the temp dir
        # (which holds copies of the payload) is removed.
        proc = subprocess.Popen(
            [exe, "-q", *args, "-o", str(dst), str(src)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            stdout, stderr = _wait_lrzip(proc, dst, action, max_out)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
        if proc.returncode != 0 or not dst.exists():
            rc = proc.returncode
            status = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
            msg = _summarize(stderr.decode(errors="replace"), stdout.decode(errors="replace"))
            raise ArtifactError(f"lrzip {action} failed ({status}): {msg}")
        if max_out is not None and dst.stat().st_size > max_out:
            raise _too_big("lrzip", max_out)
        return dst.read_bytes()


def _wait_lrzip(proc: subprocess.Popen, dst: Path, action: str, max_out: int | None) -> tuple[bytes, bytes]:
    """Wait for lrzip, watching the size of its output file when it is bounded."""
    if max_out is None:
        try:
            return proc.communicate(timeout=LRZIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"lrzip {action} timed out after {LRZIP_TIMEOUT_S} s") from None
    deadline = time.monotonic() + LRZIP_TIMEOUT_S
    while True:
        try:
            # communicate() drains the pipes while it waits, so chatty output cannot block lrzip.
            return proc.communicate(timeout=_LRZIP_POLL_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            if dst.stat().st_size > max_out:
                raise _too_big("lrzip", max_out)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise ArtifactError(f"lrzip {action} timed out after {LRZIP_TIMEOUT_S} s")


def _lrzip_codec(name: str, args: tuple[str, ...], auto: bool) -> Codec:
    def params() -> dict:
        path = shutil.which("lrzip")
        return {
            "codec": name,
            "binary": "lrzip",
            "version": _lrzip_version(path) if path else "unknown",
            "args": ["-q", *args],
            "env": {"LRZIP": "NOCONFIG"},
        }

    return Codec(
        name,
        "bytes",
        encode=lambda data: _run_lrzip(args, data, "compress"),
        decode=lambda data, max_out: _run_lrzip(("-d",), data, "decompress", max_out),
        params=params,
        available=lambda: shutil.which("lrzip") is not None,
        auto=auto,
        missing=LRZIP_MISSING,
    )


# --- the model-based entropy coder (symbol arrays, not bytes) -------------------------------------


def _entropy_encode(arrays: list, lo: int, hi: int, desc: dict) -> tuple[bytes, dict]:
    from ..coding.entropy import entropy_encode_model

    payload, model = entropy_encode_model(arrays, lo, hi, desc.get("model", "auto"))
    # The model "auto" picked is recorded so a re-pack (verify) fits only that one.
    return payload, {"model": model}


def _entropy_decode(payload: bytes, shapes: list, dtypes: list, lo: int, hi: int, desc: dict) -> list:
    from ..coding.entropy_decode import entropy_decode

    return entropy_decode(payload, shapes, dtypes, lo, hi)


def _entropy_params() -> dict:
    # Decoding depends on constriction's float→fixed-point conversion; record which one encoded.
    from importlib.metadata import version

    return {"coder": "constriction-ans", "constriction": version("constriction")}


# --- the registry ----------------------------------------------------------------------------------


def _always() -> bool:
    return True


def _library(name: str, encode, decode, params: dict, fast: bool = True) -> Codec:
    return Codec(name, "bytes", encode, decode, lambda: {"codec": name, **params}, _always, auto=fast, auto_fast=fast)


# Registration order is the order ``auto`` tries codecs in; on a size tie the earlier one is kept.
CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("entropy", "symbols", _entropy_encode, _entropy_decode, _entropy_params, _always,
              auto=True, auto_fast=True, records=("model",)),
        _library("brotli", _brotli_compress, _brotli_decompress,
                 {"library": "brotli", "version": brotli.__version__, "quality": BROTLI_QUALITY,
                  "lgwin": BROTLI_LGWIN, "mode": "generic"}),
        _library("zstd", _zstd_compress, _zstd_decompress,
                 {"library": "zstandard", "version": zstandard.__version__, "level": ZSTD_LEVEL,
                  "window_log": ZSTD_WINDOW_LOG, "content_size": True, "checksum": False}),
        _library("lzma", _lzma_compress, _lzma_decompress, {"library": "lzma", "format": "alone", "preset": "9e"}),
        _lrzip_codec("lrzip", LRZIP_ZPAQ_ARGS, auto=True),
        _lrzip_codec("lrzip-lzma", LRZIP_LZMA_ARGS, auto=False),
        _library("raw", bytes, _raw_decompress, {}, fast=False),
    )
}


def get(codec: str) -> Codec:
    try:
        return CODECS[codec]
    except KeyError:
        raise PgolfError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}") from None


def byte_codecs() -> list[str]:
    return [name for name, c in CODECS.items() if c.takes == "bytes"]


def _byte_codec(codec: str) -> Codec:
    c = get(codec)
    if c.takes != "bytes":
        raise PgolfError(f"codec {codec!r} codes symbol arrays, not bytes")
    return c


def compress(codec: str, data: bytes) -> bytes:
    return _byte_codec(codec).encode(bytes(data))


def decompress(codec: str, data: bytes, max_out: int) -> bytes:
    """Decode a byte codec's payload; more than ``max_out`` bytes of output is an ArtifactError."""
    return _byte_codec(codec).decode(bytes(data), int(max_out))


def available(codec: str) -> bool:
    """Whether ``codec`` can run here (lrzip needs its binary on PATH)."""
    return get(codec).available()


def available_codecs() -> list[str]:
    return [name for name, c in CODECS.items() if c.available()]


def codec_params(codec: str) -> dict:
    """The exact settings behind ``codec``, for the artifact manifest."""
    return get(codec).params()
