"""What the exported decoder carries in place of a package function it cannot carry as it is."""

from __future__ import annotations

from ..errors import ArtifactError


def schemes_inline() -> None:
    # Stands in for quant.base._ensure_schemes_loaded: the exporter writes the scheme table
    # itself, so there is nothing to import lazily.
    return None


def no_laid_out_groups(desc: dict, payload: bytes, shapes: list, dtypes: list, lo: int) -> list:
    # Stands in for pack.packer.decode_laid_out when no symbol group of the artifact is held by a
    # byte codec: the byte layouts are then left out of the decoder.
    raise ArtifactError(f"this decoder was exported for another artifact: it carries no byte layouts (codec {desc['codec']})")
