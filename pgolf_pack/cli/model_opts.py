"""The options every model-running command shares (--model, --model-class, --device) and the one
place the CLI builds a model through the adapter."""

from __future__ import annotations

from typing import Mapping, Optional

import typer


ModelOpt = typer.Option(None, "--model", help="your architecture: a Parameter-Golf-style train_gpt.py (its GPT is built "
                        "from its Hyperparameters; env vars apply as in training) or FILE.py:FACTORY with "
                        "FACTORY(state_dict, device) -> nn.Module; default: the reference baseline GPT")
ModelClassOpt = typer.Option(None, "--model-class", help="the nn.Module class of --model FILE.py to build (default GPT)")
DeviceOpt = typer.Option("cpu", help="cpu | cuda")


def reference_overrides(num_heads: Optional[int], num_kv_heads: Optional[int]) -> dict:
    o = {}
    if num_heads:
        o["num_heads"] = num_heads
    if num_kv_heads:
        o["num_kv_heads"] = num_kv_heads
    return o


def build_cli_model(state_dict: Mapping, model: Optional[str], model_class: Optional[str], device: str,
                    overrides: Optional[dict] = None, tied_head: Optional[Mapping[str, str]] = None):
    """The adapter's model for a command's checkpoint."""
    from ..calib.adapter import ModelSpec, build_model

    return build_model(state_dict, ModelSpec.parse(model, model_class), device, tied_head=tied_head, **(overrides or {}))


def model_line(loaded, model: Optional[str]) -> str:
    """What was built from the user's file, shown with the result (nothing for the reference GPT)."""
    return "" if model is None else f"model: {loaded.describe()}\n"
