"""Byte codecs behind one registry: ``compress(name, data)`` / ``decompress(name, data)``.

Settings are fixed per codec name, so the name plus :func:`codec_params` (recorded in the manifest)
says exactly how a payload was made. Every codec is deterministic and round-trips empty input.

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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import brotli
import zstandard

from ..errors import ArtifactError, PgolfError

LRZIP_MISSING = "lrzip binary not found on PATH; install it (apt-get install lrzip) or pick another codec"
# ZPAQ runs ~20-170 s per 4 MB on two busy cores; an hour only catches a hung process.
LRZIP_TIMEOUT_S = 3600
# A corrupted zstd header could claim any content size; real groups are far below this.
MAX_DECODED_BYTES = 1 << 31

BROTLI_QUALITY = 11
BROTLI_LGWIN = 24
ZSTD_LEVEL = 22
# 128 MiB covers any group of a 16 MB artifact; zstd still shrinks the window for small inputs.
ZSTD_WINDOW_LOG = 27
LZMA_PRESET = 9 | lzma.PRESET_EXTREME
LRZIP_ZPAQ_ARGS = ("-z", "-L", "9", "-T")
LRZIP_LZMA_ARGS = ("-L", "9", "-T")


@dataclass(frozen=True)
class Codec:
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]
    params: Callable[[], dict]
    available: Callable[[], bool]


# --- library codecs --------------------------------------------------------------------------------


def _brotli_compress(data: bytes) -> bytes:
    return brotli.compress(data, mode=brotli.MODE_GENERIC, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)


def _brotli_decompress(data: bytes) -> bytes:
    try:
        return brotli.decompress(data)
    except brotli.error as e:
        raise ArtifactError(f"brotli payload is corrupted or truncated ({e})") from None


def _zstd_compress(data: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, source_size=len(data), window_log=ZSTD_WINDOW_LOG, write_content_size=1, write_checksum=0
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def _zstd_decompress(data: bytes) -> bytes:
    try:
        size = zstandard.frame_content_size(data)
        if size < 0 or size > MAX_DECODED_BYTES:
            raise ArtifactError("zstd payload is corrupted (bad content size in frame header)")
        return zstandard.ZstdDecompressor(max_window_size=1 << ZSTD_WINDOW_LOG).decompress(data)
    except zstandard.ZstdError as e:
        raise ArtifactError(f"zstd payload is corrupted or truncated ({e})") from None


def _lzma_compress(data: bytes) -> bytes:
    # .lzma ("alone") framing: 13 header bytes against ~60 of .xz framing, same LZMA coding.
    return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=LZMA_PRESET)


def _lzma_decompress(data: bytes) -> bytes:
    try:
        return lzma.decompress(data, format=lzma.FORMAT_ALONE)
    except (lzma.LZMAError, EOFError) as e:
        raise ArtifactError(f"lzma payload is corrupted or truncated ({e})") from None


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


def _run_lrzip(args: tuple[str, ...], data: bytes, action: str) -> bytes:
    exe = _lrzip_path()
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        # lrzip wants the .lrz suffix on what it decompresses.
        src = Path(tmp) / ("payload.lrz" if action == "decompress" else "payload")
        dst = Path(tmp) / "out"
        src.write_bytes(data)
        env = {**os.environ, "LRZIP": "NOCONFIG", "TMPDIR": tmp, "TMP": tmp}
        try:
            r = subprocess.run(
                [exe, "-q", *args, "-o", str(dst), str(src)],
                capture_output=True,
                env=env,
                timeout=LRZIP_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"lrzip {action} timed out after {LRZIP_TIMEOUT_S} s") from None
        if r.returncode != 0 or not dst.exists():
            status = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
            msg = _summarize(r.stderr.decode(errors="replace"), r.stdout.decode(errors="replace"))
            raise ArtifactError(f"lrzip {action} failed ({status}): {msg}")
        return dst.read_bytes()


def _lrzip_codec(args: tuple[str, ...]) -> Codec:
    def params() -> dict:
        path = shutil.which("lrzip")
        return {
            "binary": "lrzip",
            "version": _lrzip_version(path) if path else "unknown",
            "args": ["-q", *args],
            "env": {"LRZIP": "NOCONFIG"},
        }

    return Codec(
        compress=lambda data: _run_lrzip(args, data, "compress"),
        decompress=lambda data: _run_lrzip(("-d",), data, "decompress"),
        params=params,
        available=lambda: shutil.which("lrzip") is not None,
    )


def _always() -> bool:
    return True


CODECS: dict[str, Codec] = {
    "brotli": Codec(
        _brotli_compress,
        _brotli_decompress,
        lambda: {"library": "brotli", "version": brotli.__version__, "quality": BROTLI_QUALITY, "lgwin": BROTLI_LGWIN, "mode": "generic"},
        _always,
    ),
    "zstd": Codec(
        _zstd_compress,
        _zstd_decompress,
        lambda: {
            "library": "zstandard",
            "version": zstandard.__version__,
            "level": ZSTD_LEVEL,
            "window_log": ZSTD_WINDOW_LOG,
            "content_size": True,
            "checksum": False,
        },
        _always,
    ),
    "lzma": Codec(
        _lzma_compress,
        _lzma_decompress,
        lambda: {"library": "lzma", "format": "alone", "preset": "9e"},
        _always,
    ),
    "lrzip": _lrzip_codec(LRZIP_ZPAQ_ARGS),
    "lrzip-lzma": _lrzip_codec(LRZIP_LZMA_ARGS),
    "raw": Codec(bytes, bytes, lambda: {}, _always),
}


def _get(codec: str) -> Codec:
    try:
        return CODECS[codec]
    except KeyError:
        raise PgolfError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}") from None


def compress(codec: str, data: bytes) -> bytes:
    return _get(codec).compress(bytes(data))


def decompress(codec: str, data: bytes) -> bytes:
    return _get(codec).decompress(bytes(data))


def available(codec: str) -> bool:
    """Whether ``codec`` can run here (lrzip needs its binary on PATH)."""
    return _get(codec).available()


def available_codecs() -> list[str]:
    return [name for name, c in CODECS.items() if c.available()]


def codec_params(codec: str) -> dict:
    """The exact settings behind ``codec``, for the artifact manifest."""
    return {"codec": codec, **_get(codec).params()}
