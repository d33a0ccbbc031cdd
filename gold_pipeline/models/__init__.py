"""Causal LMs: loading (hub, local, packaged GGUF models rebuilt for transformers) and seeded generation."""
