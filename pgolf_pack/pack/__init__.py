"""Packing: byte layouts, byte codecs and the artifact container."""
