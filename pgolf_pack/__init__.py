"""pgolf-pack: quantize and pack small LM checkpoints for byte-capped scoring (Parameter Golf)."""

__version__ = "0.1.0"

CAP_BYTES = 16_000_000
