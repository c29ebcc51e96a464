"""Running models: the adapter (any architecture, or the reference GPT), token shards, Hessians,
sensitivity and BPB evaluation."""

from .adapter import LoadedModel, ModelSpec, build_model, load_model
from .bpb import ByteLuts, evaluate_bpb, token_byte_luts
from .calibrate import calibration_batches, collect_hessians
from .model import GPT, GPTConfig
from .sensitivity import Sensitivity, measure_sensitivity
from .shards import load_tokens, read_shard, write_shard

__all__ = [
    "GPT",
    "GPTConfig",
    "ByteLuts",
    "LoadedModel",
    "ModelSpec",
    "Sensitivity",
    "build_model",
    "calibration_batches",
    "collect_hessians",
    "evaluate_bpb",
    "load_model",
    "load_tokens",
    "measure_sensitivity",
    "read_shard",
    "token_byte_luts",
    "write_shard",
]
