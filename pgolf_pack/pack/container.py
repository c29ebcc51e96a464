"""The artifact file: magic, version, a compressed JSON manifest, then the group payloads.

Layout (all integers little-endian)::

    b"PGPK" | u8 format version | u32 manifest length | u32 crc32(manifest) | manifest | payloads

The manifest is brotli-compressed canonical JSON (sorted keys, no spaces) so identical inputs give
identical bytes. Each group entry carries ``offset``/``length`` into the payload area, a crc32 of
the payload (so corruption is reported before any decoder sees it) and a crc32 of the decoded
bytes (so a decoder bug can never go unnoticed).
"""

from __future__ import annotations

import json
import struct
import zlib

import brotli

from ..errors import ArtifactError

MAGIC = b"PGPK"
# The artifact format: written in the header byte and as the manifest's "format". Bump it with any
# change to what a byte means (container, manifest fields, layouts, a codec's buffer format); the
# golden tests (tests/test_golden_format.py) pin format 1's bytes and fail on an unbumped change.
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sBII")


def crc32(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def write_container(manifest: dict, payloads: list[bytes]) -> bytes:
    """Serialise; fills in each group's offset, length and payload crc from ``payloads``."""
    groups = manifest["groups"]
    if len(groups) != len(payloads):
        raise ValueError("one payload per group expected")
    offset = 0
    for g, p in zip(groups, payloads):
        g["offset"], g["length"], g["payload_crc32"] = offset, len(p), crc32(p)
        offset += len(p)
    man = brotli.compress(canonical_json(manifest), quality=11)
    return b"".join([_HEAD.pack(MAGIC, FORMAT_VERSION, len(man), crc32(man)), man, *payloads])


def read_container(blob: bytes, max_decoded_bytes: int | None = None) -> tuple[dict, memoryview]:
    """Parse the header and manifest; returns (manifest, payload area).

    The manifest is validated in full (:mod:`.manifest_check`) before this returns, so no payload
    is ever read through a manifest that does not add up; ``max_decoded_bytes`` overrides the
    ceiling on what decoding may allocate ($PGOLF_MAX_DECODED_BYTES, else the default).
    """
    from .manifest_check import parse_manifest, validate_manifest

    if len(blob) < _HEAD.size:
        raise ArtifactError("artifact is truncated: shorter than its header")
    magic, version, mlen, mcrc = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise ArtifactError("not a pgolf-pack artifact (bad magic)")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version} is not supported (this pgolf-pack reads {FORMAT_VERSION})")
    start = _HEAD.size
    if len(blob) < start + mlen:
        raise ArtifactError("artifact is truncated inside its manifest")
    man = bytes(blob[start : start + mlen])
    if crc32(man) != mcrc:
        raise ArtifactError("artifact manifest is corrupted (checksum mismatch)")
    manifest = parse_manifest(man)
    payload = memoryview(blob)[start + mlen :]
    validate_manifest(manifest, len(payload), max_decoded_bytes)
    return manifest, payload


def group_payload(manifest_group: dict, payload: memoryview) -> bytes:
    g = manifest_group
    data = bytes(payload[g["offset"] : g["offset"] + g["length"]])
    if crc32(data) != g["payload_crc32"]:
        raise ArtifactError(f"group {g['name']} is corrupted (payload checksum mismatch)")
    return data


def header_bytes(blob: bytes) -> int:
    """Bytes of header + manifest (everything that is not a group payload)."""
    _, _, mlen, _ = _HEAD.unpack_from(blob)
    return _HEAD.size + mlen
