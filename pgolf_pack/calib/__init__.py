"""Calibration and evaluation support: the reference GPT, token shards and BPB evaluation."""

from .bpb import ByteLuts, evaluate_bpb, token_byte_luts
from .model import GPT, GPTConfig, load_model
from .shards import load_tokens, read_shard, write_shard

__all__ = [
    "GPT",
    "GPTConfig",
    "ByteLuts",
    "evaluate_bpb",
    "load_model",
    "load_tokens",
    "read_shard",
    "token_byte_luts",
    "write_shard",
]
