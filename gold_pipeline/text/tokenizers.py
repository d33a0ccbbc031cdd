"""Loading tokenizers (hub ids, local dirs, offline `pkg:` names), their chat templates and fingerprints.

Every tokenizer returned by `load_tokenizer` is a `PreTrainedTokenizerFast` (transformers' tokenizers-backed
class) with a chat template and `tokenizer.gold_chat_template_source` in {"own", "file", "default"}.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gold_pipeline.errors import GoldInputError
from gold_pipeline.text.packaged import PKG_TOKENIZERS, packaged_tokenizer

DEFAULT_CHAT_TEMPLATE = (
    # Built-in template for tokenizers that ship none. ChatML layout:
    #   [bos]<|im_start|>{role}\n{content}{end}\n ... and, for generation, <|im_start|>assistant\n
    # where {end} is the tokenizer's eos token (so the end of an assistant turn is one special token the
    # student can learn to emit), or the literal text "<|im_end|>" when the tokenizer has no eos token.
    "{{- bos_token if bos_token else '' -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + (eos_token if eos_token else '<|im_end|>')"
    " + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def load_tokenizer(name_or_path: str, *, revision: str | None = None, chat_template: str | None = None):
    """Load a tokenizer by `pkg:` name, local directory (a model dir's own tokenizer) or hub id.

    chat_template: template text (or a path to a template file); None -> the tokenizer's own template, else
    DEFAULT_CHAT_TEMPLATE. Sets `tokenizer.gold_chat_template_source` to "own", "file" or "default".
    """
    name = str(name_or_path)
    if name.startswith("pkg:"):
        tokenizer = packaged_tokenizer(name)
        if tokenizer is None:
            raise GoldInputError(_unknown_name_message(name))
    else:
        tokenizer = _load_auto(name, revision)
    tokenizer.gold_name = name
    return _attach_chat_template(tokenizer, chat_template)


def _unknown_name_message(name: str) -> str:
    listing = "\n".join(f"  {k}: {v}" for k, v in PKG_TOKENIZERS.items())
    return (
        f"Unknown tokenizer {name!r}: it is neither a packaged `pkg:` name, an existing local directory, nor a "
        f"loadable hub id. Use a hub id, a local tokenizer/model directory, or one of the packaged names:\n"
        f"{listing}"
    )


def _load_auto(name: str, revision: str | None):
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise GoldInputError(f"{_unknown_name_message(name)}\n(no directory {name!r} exists)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name), revision=revision)
    except Exception as error:  # hub unreachable, missing dir, not a tokenizer, ...
        raise GoldInputError(f"{_unknown_name_message(name)}\n(loading it failed with: {error})") from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise GoldInputError(
            f"Tokenizer {name!r} loaded as {type(tokenizer).__name__}, which has no `tokenizers` backend; gold needs"
            f" a fast tokenizer (a tokenizer.json or a convertible slow tokenizer) for byte-exact alignment."
        )
    return tokenizer


def _attach_chat_template(tokenizer, chat_template: str | None):
    if chat_template is not None:
        text = chat_template
        if "{" not in chat_template and os.path.isfile(chat_template):
            text = Path(chat_template).read_text(encoding="utf-8")
        tokenizer.chat_template = text
        tokenizer.gold_chat_template_source = "file"
    elif isinstance(tokenizer.chat_template, str) and tokenizer.chat_template.strip():
        tokenizer.gold_chat_template_source = "own"
    else:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.gold_chat_template_source = "default"
    return tokenizer


def _backend_sha(tokenizer) -> str:
    cached = getattr(tokenizer, "_gold_backend_sha", None)
    if cached is None:
        cached = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
        tokenizer._gold_backend_sha = cached
    return cached


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex over the backend (vocab, merges, added/special tokens, normalizer, ...) and chat template."""
    digest = hashlib.sha256()
    digest.update(_backend_sha(tokenizer).encode())
    digest.update(b"\0")
    digest.update((tokenizer.chat_template or "").encode("utf-8") if isinstance(tokenizer.chat_template, str)
                  else json.dumps(tokenizer.chat_template, sort_keys=True).encode("utf-8"))  # fmt: skip
    return digest.hexdigest()
