"""Registers the quantization methods that live in their own modules (imported lazily)."""
