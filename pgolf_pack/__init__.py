"""pgolf-pack: quantize and pack small LM checkpoints for byte-capped scoring (Parameter Golf)."""

__version__ = "0.1.0"

CAP_BYTES = 16_000_000

# The quantize API, importable from the package root. Loaded on first use, so that importing a
# leaf module (or the version) does not pull in torch and the packer.
_API = ("quantize", "quantize_file", "RecipePlan", "BitBudgetPlan", "RDPlan", "QuantizeResult", "Progress")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pgolf_pack' has no attribute {name!r}")


__all__ = ["CAP_BYTES", "__version__", *_API]
