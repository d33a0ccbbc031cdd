"""Shared by tests/test_{tokenization,byte_tables,alignment,vocab_map}.py: each packaged tokenizer is loaded once
per pytest process (from the on-disk cache after the first build) and reused read-only."""

from __future__ import annotations

from functools import lru_cache

from gold_pipeline.byte_tables import byte_table
from gold_pipeline.tokenization import load_tokenizer


@lru_cache(maxsize=None)
def tok(name: str):
    """A shared tokenizer: do not change its chat template (load a fresh one for that)."""
    return load_tokenizer(name)


def table(name: str):
    return byte_table(tok(name))
