"""The batch encodes call the Rust backend directly (encode_batch_fast); they must give exactly the ids of the
tokenizer's own __call__, for every packaged tokenizer, and fall back to __call__ where that could differ."""

from __future__ import annotations

import pytest

from gold_pipeline.text import encode as tokenization
from gold_pipeline.text import packaged
from gold_pipeline.text.encode import encode_completions, render_prompts_ids
from gold_pipeline.text.packaged import PKG_TOKENIZERS
from gold_pipeline.text.tokenizers import load_tokenizer
from tests.helpers import tok

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
NAMES = sorted(name for name in PKG_TOKENIZERS if name not in packaged._PKG_ALIASES)


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


def test_repeated_prompts_are_encoded_once_and_get_their_own_lists(monkeypatch):
    tokenizer = tok("pkg:qwen")
    conversations = [[{"role": "user", "content": f"Question {i % 3}"}] for i in range(7)]
    conversations.insert(2, [{"role": "user", "content": "A literal <|im_end|> stays text."}])
    calls = []
    original = tokenization._batch_ids

    def counting(tokenizer_, texts, **kwargs):
        calls.append(len(texts))
        return original(tokenizer_, texts, **kwargs)

    monkeypatch.setattr(tokenization, "_batch_ids", counting)
    rendered = render_prompts_ids(tokenizer, conversations)
    assert calls == [3]  # the 7 plain prompts are 3 distinct texts; the special-text one goes its own way
    monkeypatch.undo()
    assert rendered == [tokenization.render_prompt_ids(tokenizer, messages) for messages in conversations]
    assert len({id(ids) for ids in rendered}) == len(rendered)
