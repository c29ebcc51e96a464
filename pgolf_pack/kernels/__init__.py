"""Numba kernels for the packer; each module also holds the numpy reference it is tested against."""

from .bitpack import pack_bits, packed_size, unpack_bits
from .rowsort import l1_chain_order
from .shuffle import byte_shuffle, byte_unshuffle

__all__ = [
    "pack_bits",
    "unpack_bits",
    "packed_size",
    "byte_shuffle",
    "byte_unshuffle",
    "l1_chain_order",
]
