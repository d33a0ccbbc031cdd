"""The batch encodes call the Rust backend directly (encode_batch_fast); they must give exactly the ids of the
tokenizer's own __call__, for every packaged tokenizer, and fall back to __call__ where that could differ."""

from __future__ import annotations

import pytest

from gold_pipeline import tokenization
from gold_pipeline.tokenization import PKG_TOKENIZERS, encode_completions, load_tokenizer, render_prompts_ids
from tokenizer_fixtures import tok

TEXTS = [
    "Hello, world!",
    "   leading spaces",
    " one leading space",
    "trailing   ",
    "<|im_end|> <s> </s> [INST] <start_of_turn> <|endoftext|> literal special text",
    "👍🏽 中文字符测试 e\u0301 \u200b\ufeff\n\n\tdef f(x):\n    return x",
    "ab\x1dcd ef",
    "x",
]
NAMES = sorted(name for name in PKG_TOKENIZERS if name not in tokenization._PKG_ALIASES)


@pytest.mark.parametrize("name", NAMES)
def test_direct_batch_encode_equals_the_tokenizer_call(name):
    tokenizer = tok(name)
    assert tokenization._direct_encode(tokenizer)
    assert encode_completions(tokenizer, TEXTS) == tokenizer(
        TEXTS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    plain = tokenization._batch_ids(tokenizer, TEXTS, split_special_tokens=False)
    assert plain == tokenizer(TEXTS, add_special_tokens=False)["input_ids"]


def test_truncation_on_the_backend_falls_back_to_the_tokenizer_call():
    tokenizer = load_tokenizer("pkg:qwen")
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    assert encode_completions(tokenizer, TEXTS) == [
        tokenization.encode_completion(load_tokenizer("pkg:qwen"), text) for text in TEXTS]  # not cut to 3


def test_prompts_keep_the_template_specials_with_the_direct_path():
    tokenizer = tok("pkg:qwen")
    conversations = [[{"role": "user", "content": f"Question {i}"}] for i in range(5)]
    rendered = render_prompts_ids(tokenizer, conversations)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(ids.count(im_start) == 2 for ids in rendered)  # user turn + generation prompt
