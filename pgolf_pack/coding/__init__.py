"""Symbol coding beneath both quant/ and pack/: the entropy coder's models and its ANS streams.

quant/ prices codes with these models (RDOQ, trellis) and pack/ registers the coder as a codec, so
it sits below both. The decoder side (entropy_decode, entropy_tables) imports nothing from the
encoder side (entropy, entropy_models)."""
