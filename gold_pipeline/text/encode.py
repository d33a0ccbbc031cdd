"""Token ids of prompts and completions, exactly as gold aligns and trains on them.

- `render_prompt_ids`: the prompt through the side's own chat template (add_generation_prompt=True);
- `encode_completion`: the completion text tokenized on its own (no BOS/EOS);
- `end_of_turn_ids`: what the template writes after an assistant turn (the student learns to stop with it).

Special-token text inside message content or a completion (for example a literal "<|im_end|>") is always
tokenized as plain text, never as the special token.
"""

from __future__ import annotations

import json
import re

from gold_pipeline.errors import GoldInputError


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise GoldInputError(
                f"messages[{index}] must be a dict with a string 'content' (got {message!r:.80}); convert "
                f"multi-part content to text before rendering."
            )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_many(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """_render(..., add_generation_prompt=True) of many conversations with one apply_chat_template call."""
    if not conversations:
        return []
    plain = all(isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) for messages in conversations)
    if not plain:  # the one-row path, with its errors
        return [_render(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    if not isinstance(texts, list) or len(texts) != len(conversations):  # not read as a batch
        return [_render(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    return texts



def _special_strings(tokenizer) -> tuple[str, ...]:
    """Texts of the special added tokens, longest first (computed once per tokenizer)."""
    cached = getattr(tokenizer, "_gold_special_strings", None)
    if cached is None:
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials.update(s for s in tokenizer.all_special_tokens if s)
        cached = tuple(sorted(specials, key=len, reverse=True))
        tokenizer._gold_special_strings = cached
    return cached


def _special_pattern(tokenizer) -> re.Pattern:
    """One compiled alternation of the special-token texts (computed once per tokenizer)."""
    cached = getattr(tokenizer, "_gold_special_pattern", None)
    if cached is None:
        specials = _special_strings(tokenizer)
        cached = re.compile("|".join(re.escape(s) for s in specials)) if specials else re.compile(r"(?!x)x")
        tokenizer._gold_special_pattern = cached
    return cached


def _plain_ids(tokenizer, text: str, *, at_start: bool) -> list[int]:
    """Ids of `text` with every special-token text treated as plain text, no BOS/EOS added.

    at_start=False: the text follows a special token inside a longer string, so a SentencePiece "first"
    dummy prefix is not added (exactly what tokenizing the whole string does).
    """
    if not text:
        return []
    if not at_start:
        backend = _no_first_prefix_backend(tokenizer)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _no_first_prefix_backend(tokenizer):
    """For Metaspace(prepend_scheme="first") tokenizers: a copy of the backend with prepend_scheme="never"."""
    cached = getattr(tokenizer, "_gold_no_first_prefix", False)
    if cached is not False:
        return cached
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    changed = False

    def visit(node):
        nonlocal changed
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"] = "never"
                changed = True
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(state.get("pre_tokenizer"))
    visit(state.get("normalizer"))
    backend = None
    if changed:
        backend = Tokenizer.from_str(json.dumps(state))
        backend.encode_special_tokens = True
    tokenizer._gold_no_first_prefix = backend
    return backend


def encode_completion(tokenizer, text: str) -> list[int]:
    """The completion text tokenized on its own: no BOS/EOS, special-token text stays plain text."""
    if not isinstance(text, str):
        raise GoldInputError(f"completion text must be a str, got {type(text).__name__}")
    return _plain_ids(tokenizer, text, at_start=True)


def encode_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    """encode_completion for many texts in one batch call (the Rust tokenizer's thread pool)."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise GoldInputError(f"completion text {index} must be a str, got {type(text).__name__}")
    if not texts:
        return []
    return _batch_ids(tokenizer, list(texts), split_special_tokens=True)


def _batch_ids(tokenizer, texts: list[str], *, split_special_tokens: bool) -> list[list[int]]:
    """tokenizer(texts, add_special_tokens=False, split_special_tokens=...)["input_ids"].

    For a plain `TokenizersBackend` (what load_tokenizer returns) the Rust backend is called directly with
    `encode_batch_fast` (no character offsets, no attention masks or type ids built and thrown away): the same
    ids, about 10% less time. Anything else (a subclass that changes encoding, truncation or padding configured
    on the backend, an older `tokenizers`) goes through the tokenizer's own __call__."""
    backend = tokenizer.backend_tokenizer if _direct_encode(tokenizer) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = split_special_tokens
    try:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous


def _direct_encode(tokenizer) -> bool:
    """Whether tokenizer(texts, add_special_tokens=False) is exactly its backend's batch encode (cached)."""
    cached = getattr(tokenizer, "_gold_direct_encode", None)
    if cached is None:
        try:
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # another transformers layout
            cached = False
        else:
            cls = type(tokenizer)
            cached = (isinstance(tokenizer, TokenizersBackend)
                      and getattr(cls, "_encode_plus", None) is TokenizersBackend._encode_plus
                      and cls.__call__ is PreTrainedTokenizerBase.__call__
                      and not hasattr(tokenizer, "_switch_to_input_mode")
                      and getattr(tokenizer, "_tokenizer", None) is tokenizer.backend_tokenizer
                      and hasattr(tokenizer.backend_tokenizer, "encode_batch_fast"))  # fmt: skip
        tokenizer._gold_direct_encode = cached
    return cached


_SENTINEL = "\ue000GOLD{}\ue001"
_SENTINEL_RE = re.compile("\ue000GOLD(\\d+)\ue001")


def render_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids from the tokenizer's chat template with add_generation_prompt=True.

    Special tokens written by the template are special tokens; special-token text inside message content is
    tokenized as plain text.
    """
    text = _render(tokenizer, messages, add_generation_prompt=True)
    pattern = _special_pattern(tokenizer)
    if not any(pattern.search(m["content"]) for m in messages):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return _encode_with_plain_content(tokenizer, messages, text, pattern)


def render_prompts_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """render_prompt_ids for many prompts: the plain ones in one batch call (each distinct prompt text once, e.g.
    several generations of one prompt), the rest one by one. Every row gets a list of its own."""
    pattern = _special_pattern(tokenizer)
    texts = _render_many(tokenizer, conversations)
    careful = [any(pattern.search(m["content"]) for m in messages) for messages in conversations]
    plain = list(dict.fromkeys(text for text, slow in zip(texts, careful) if not slow))  # distinct, in order
    split = bool(getattr(tokenizer, "split_special_tokens", False))  # what tokenizer(plain) would use
    plain_ids = dict(zip(plain, _batch_ids(tokenizer, plain, split_special_tokens=split) if plain else []))
    out = []
    for messages, text, slow in zip(conversations, texts, careful):
        if slow:
            out.append(_encode_with_plain_content(tokenizer, messages, text, pattern))
        else:
            ids = plain_ids[text]
            out.append(ids)
            plain_ids[text] = list(ids)  # a repeat of this prompt gets a copy
    return out


def _encode_with_plain_content(tokenizer, messages, text: str, pattern: re.Pattern) -> list[int]:
    # Render with sentinels to learn which parts of `text` the template wrote and which are content.
    marked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    rendered = _render(tokenizer, marked, add_generation_prompt=True)
    pieces = _SENTINEL_RE.split(rendered)  # template, index, template, index, ..., template
    template_parts, order = pieces[0::2], [int(i) for i in pieces[1::2]]
    spans: list[tuple[int, int]] | None = None  # (start, end) of template-written text in `text`
    for transform in (lambda s: s, str.strip):
        contents = [transform(messages[i]["content"]) for i in order]
        if "".join(p + c for p, c in zip(template_parts, contents + [""])) == text:
            spans, pos = [], 0
            for part, content in zip(template_parts, contents + [""]):
                spans.append((pos, pos + len(part)))
                pos += len(part) + len(content)
            break
    if spans is None:
        raise GoldInputError(
            "The chat template transforms message content in a way gold cannot trace, and a message contains "
            "special-token text that must stay plain text; pass a simpler chat template (--*-chat-template FILE)."
        )
    ids: list[int] = []
    cursor = 0
    for start, end in spans:
        for match in pattern.finditer(text, start, end):
            ids.extend(_plain_ids(tokenizer, text[cursor : match.start()], at_start=cursor == 0))
            ids.append(tokenizer.convert_tokens_to_ids(match.group(0)))
            cursor = match.end()
    ids.extend(_plain_ids(tokenizer, text[cursor:], at_start=cursor == 0))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids the chat template writes right after an assistant message's content, up to and including the first
    special token (e.g. [<|im_end|>]); [eos] when the template writes no special token there."""
    cached = getattr(tokenizer, "_gold_eot", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return list(cached[1])
    sentinel = "GOLDSENTINEL"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    text = _render(tokenizer, messages, add_generation_prompt=False)
    position = text.rfind(sentinel)
    if position < 0:
        raise GoldInputError("The chat template does not render the assistant message's content; check the template.")
    after = text[position + len(sentinel) :]
    special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    result: list[int] = []
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"] if after else []:
        result.append(token_id)
        if token_id in special_ids:
            break
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise GoldInputError(
                "The chat template writes no special token after an assistant turn and the tokenizer has no eos "
                "token, so gold cannot teach the student to stop; pass a chat template that ends turns with one."
            )
        result = [eos]
    tokenizer._gold_eot = (tokenizer.chat_template, tuple(result))
    return result
