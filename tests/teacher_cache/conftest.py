"""Fixtures of the teacher-cache tests."""

import pytest

from gold_pipeline.models.loading import tiny_model_for
from tests.helpers import tok


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama for the SmolLM2 tokenizer, saved as a model folder (loaded by name in worker processes)."""
    path = tmp_path_factory.mktemp("tiny-teacher")
    tiny_model_for(tok("pkg:smollm2"), seed=0).save_pretrained(path)
    return path
