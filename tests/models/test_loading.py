"""Model loading: tiny models for tests, local checkpoints, and the packaged GGUF models (slow)."""

from __future__ import annotations

import time

import pytest
import torch

from gold_pipeline.models.loading import (
    PKG_MODELS,
    load_model,
    model_tokenizer_name,
    packaged_model_dir,
    plain_copy,
    resolve_dtype,
    tiny_model_for,
)
from gold_pipeline.text.encode import render_prompt_ids
from gold_pipeline.text.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("pkg:smollm2")


def test_tiny_model_fits_the_tokenizer_and_is_seeded(tokenizer):
    state = torch.random.get_rng_state()
    a, b, c = tiny_model_for(tokenizer, seed=0), tiny_model_for(tokenizer, seed=0), tiny_model_for(tokenizer, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG must be left alone"
    assert a.config.vocab_size == len(tokenizer) and a.config.hidden_size == 64 and a.config.num_hidden_layers == 2
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.eos_token_id == tokenizer.eos_token_id and not a.training
    wide = tiny_model_for(tokenizer, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    assert wide.config.hidden_size == 32


def test_load_model_from_a_local_checkpoint(tmp_path, tokenizer):
    tiny_model_for(tokenizer, seed=3).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    ids = torch.tensor([[1, 2, 3]])
    reference = tiny_model_for(tokenizer, seed=3)
    assert torch.allclose(load_model(str(tmp_path))(ids).logits, reference(ids).logits)


def test_plain_copy_makes_a_quantized_config_model_saveable(tmp_path, tokenizer):
    model = tiny_model_for(tokenizer, seed=0)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    plain = plain_copy(model)
    assert not hasattr(plain.config, "quantization_config")
    plain.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(load_model(str(tmp_path))(ids).logits, model(ids).logits)


def test_clear_errors():
    with pytest.raises(ValueError, match="Unknown packaged model"):
        packaged_model_dir("pkg:nope")
    with pytest.raises(ValueError, match="no revisions"):
        load_model("pkg:smollm2-135m-instruct", revision="main")
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("float8")
    assert resolve_dtype("auto") is None and resolve_dtype("float16") is torch.float16
    assert model_tokenizer_name("pkg:gemma3-270m") == "pkg:gemma3-270m" and model_tokenizer_name("x/y") == "x/y"
    assert set(PKG_MODELS) == {"pkg:smollm2-135m-instruct", "pkg:gemma3-270m", "pkg:qwen2.5-coder-0.5b-instruct"}


@pytest.mark.slow
def test_packaged_smollm2_is_a_plain_saveable_model(tmp_path, monkeypatch, tokenizer):
    """GGUF -> plain model cached as safetensors; equals the GGUF-loaded model; second load is fast."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GOLD_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model("pkg:smollm2-135m-instruct")
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    started = time.perf_counter()
    again = load_model("pkg:smollm2-135m-instruct")
    assert time.perf_counter() - started < 15
    model.save_pretrained(tmp_path / "saved")                    # a GGUF-loaded model would refuse this
    gguf = PKG_MODELS["pkg:smollm2-135m-instruct"].gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ids = torch.tensor([render_prompt_ids(tokenizer, [{"role": "user", "content": "Hi!"}])])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, direct(ids).logits, atol=1e-5)
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.slow
def test_packaged_gemma3_loads_as_a_plain_model():
    model = load_model("pkg:gemma3-270m")
    assert type(model).__name__.startswith("Gemma3") and model.config.vocab_size >= 262_000
    assert not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[2, 100, 200]])).logits).all()


@pytest.mark.slow
def test_packaged_qwen_coder_teacher_answers_coherently():
    """The real Qwen2.5-Coder-0.5B-Instruct (six joined GGUF parts, dequantized): a qwen2 model with the
    tokenizer's 151,936 rows that answers a sum greedily."""
    from gold_pipeline.models.generation import SamplingSettings, generate_seeded

    model = load_model("pkg:qwen2.5-coder-0.5b-instruct")
    tok = load_tokenizer(model_tokenizer_name("pkg:qwen2.5-coder-0.5b-instruct"))
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok) == 151_936
    prompt = render_prompt_ids(tok, [{"role": "user", "content": "What is 47 + 38? Answer with the number only."}])
    (ids,), _ = generate_seeded(model, [prompt], [0], SamplingSettings(temperature=0.0, max_new_tokens=8),
                                stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")], pad_id=tok.pad_token_id)
    assert tok.decode(ids, skip_special_tokens=True).strip() == "85"
