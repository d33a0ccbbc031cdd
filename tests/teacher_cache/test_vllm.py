"""vLLM backend on CPU: everything but the engine (request building, output parsing, the missing-vllm error).
The GPU check of the engine itself belongs to the vLLM issue."""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field

import numpy as np
import pytest

from gold_pipeline.errors import BackendUnavailable
from gold_pipeline.teacher_cache import TeacherCacheConfig
from gold_pipeline.teacher_cache.base import TeacherRequest
from gold_pipeline.teacher_cache.vllm import (
    VLLMBackend,
    engine_kwargs,
    import_vllm,
    prompt_of,
    result_from_output,
    sampling_kwargs,
)


@dataclass
class Logprob:            # the fields of vllm.logprobs.Logprob we read
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str
    text: str = ""
    index: int = 0


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_token_ids: list[int] = field(default_factory=list)


def cfg(tmp_path, **overrides) -> TeacherCacheConfig:
    fields = dict(dataset="d.jsonl", out=tmp_path / "o", teacher="Qwen/Qwen2.5-0.5B-Instruct", backend="vllm",
                  top_k=16, tensor_parallel_size=2, gpu_memory_utilization=0.5, max_model_len=4096,
                  model_impl="transformers", seed=3)
    fields.update(overrides)
    return TeacherCacheConfig(**fields)


def test_engine_kwargs(tmp_path):
    kwargs = engine_kwargs(cfg(tmp_path))
    assert kwargs["model"] == kwargs["tokenizer"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["max_model_len"] == 4096 and kwargs["model_impl"] == "transformers"
    assert kwargs["max_logprobs"] == 16 and kwargs["logprobs_mode"] == "raw_logprobs"
    assert "max_model_len" not in engine_kwargs(cfg(tmp_path, max_model_len=None))
    with pytest.raises(ValueError, match="packaged model"):
        engine_kwargs(cfg(tmp_path, teacher="pkg:smollm2-135m-instruct"))


def test_sampling_kwargs_generate_and_score():
    request = TeacherRequest("s", [1, 2, 3], seed=42)
    generate = sampling_kwargs(request, top_k=16, temperature=0.8, top_p=0.95, sampling_top_k=0,
                               max_new_tokens=64, stop_ids=[2, 0])
    assert generate == {"n": 1, "temperature": 0.8, "top_p": 0.95, "top_k": -1, "seed": 42, "max_tokens": 64,
                        "logprobs": 16, "stop_token_ids": [2, 0], "skip_special_tokens": False}
    score = TeacherRequest("s", [1, 2, 3], seed=42, completion_ids=[7, 8, 2])
    assert sampling_kwargs(score, top_k=16, temperature=0.8, top_p=1, sampling_top_k=5, max_new_tokens=64,
                           stop_ids=[2]) == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 16,
                                             "detokenize": False}
    assert prompt_of(score) == {"prompt_token_ids": [1, 2, 3, 7, 8, 2]}


def _entry(actual: int, k: int, actual_lp: float = -0.2) -> dict[int, Logprob]:
    entry = {100 + j: Logprob(-1.0 - j, rank=j + 1) for j in range(k)}
    entry[actual] = Logprob(actual_lp)
    return entry


def test_result_from_generation_output():
    request = TeacherRequest("s", [1, 2], seed=0)
    ids = [11, 12, 2]
    output = RequestOutput([CompletionOutput(ids, [_entry(i, 3) for i in ids], "stop")])
    result = result_from_output(request, output, k=3, stop_ids=[2])
    assert result.completion_ids == ids and result.finish_reason == "stop" and not result.stats
    np.testing.assert_allclose(result.token_logprobs, [-0.2] * 3)
    assert result.topk_ids[0].tolist() == [11, 100, 101]       # sorted by log-prob, actual token included
    assert np.all(np.diff(result.topk_logprobs, axis=1) <= 0)
    length = RequestOutput([CompletionOutput([11], [_entry(11, 3, actual_lp=-9.0)], "length")])
    result = result_from_output(request, length, k=3, stop_ids=[2])
    assert result.finish_reason == "length" and result.topk_ids[0].tolist() == [100, 101, 102]


def test_result_from_prompt_logprobs_score_only():
    request = TeacherRequest("s", [1, 2], seed=0, completion_ids=[7, 2])
    prompt_lps = [None, _entry(2, 2), _entry(7, 2), _entry(2, 2)]
    output = RequestOutput([CompletionOutput([5], None, "length")], prompt_logprobs=prompt_lps)
    result = result_from_output(request, output, k=2, stop_ids=[2])
    assert result.completion_ids == [7, 2] and result.finish_reason == "stop"
    assert result.topk_ids.tolist() == [[7, 100], [2, 100]]
    with pytest.raises(ValueError, match="fewer than --top-k 5"):
        result_from_output(request, output, k=5, stop_ids=[2])


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(BackendUnavailable, match=r"pip install 'gold-pipeline\[vllm\]'.*--backend hf"):
        import_vllm()
    with pytest.raises(BackendUnavailable, match="optional extra"):
        VLLMBackend.from_config(cfg(tmp_path), stop_ids=[2])


def test_vllm_config_validation(tmp_path):
    with pytest.raises(ValueError, match="--tensor-parallel-size"):
        cfg(tmp_path, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="--gpu-memory-utilization"):
        cfg(tmp_path, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="--model-impl"):
        cfg(tmp_path, model_impl="jax")
