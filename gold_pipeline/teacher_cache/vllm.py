"""vLLM offline engine backend (optional extra `gold-pipeline[vllm]`, CUDA only; no CPU build exists).

Written against vLLM's documented offline API: `vllm.LLM(model=..., tensor_parallel_size=...,
gpu_memory_utilization=..., max_model_len=..., model_impl=..., max_logprobs=..., logprobs_mode=...)`,
`llm.generate(prompts, sampling_params)` with `{"prompt_token_ids": [...]}` (TokensPrompt) prompts and one
`SamplingParams` per request, and `RequestOutput.outputs[0]` (`token_ids`, `logprobs`, `finish_reason`) /
`RequestOutput.prompt_logprobs`. Log-prob entries are `dict[token_id, Logprob(logprob, rank, decoded_token)]`
holding the top-K plus the actual token.

- generation: `SamplingParams(logprobs=K, seed=<per sample>, stop_token_ids=<end-of-turn, EOS>)`;
- score-only: the completion is appended to the prompt and scored through `prompt_logprobs=K` with
  `max_tokens=1` (the one generated token is dropped).
`logprobs_mode="raw_logprobs"` makes vLLM report the raw model distribution (before temperature/top-p), like the
hf backend. Everything but the engine call is plain Python and tested on CPU.
"""

from __future__ import annotations

import numpy as np

from gold_pipeline.errors import BackendUnavailable, GoldInputError
from gold_pipeline.teacher_cache.base import TeacherRequest, TeacherResult

VLLM_MISSING = (
    "--backend vllm needs vLLM, which is not installed. It is an optional extra with no CPU build: on a CUDA "
    "machine run `pip install 'gold-pipeline[vllm]'`; on this machine use --backend hf (or --backend openai "
    "against a running server)."
)


def import_vllm():
    """The vllm module, or BackendUnavailable with the install hint."""
    try:
        import vllm
    except ImportError as error:
        raise BackendUnavailable(VLLM_MISSING) from error
    return vllm


def engine_kwargs(cfg) -> dict:
    """Keyword arguments of `vllm.LLM` for a TeacherCacheConfig."""
    kwargs = {
        "model": cfg.teacher,
        "tokenizer": cfg.teacher_tokenizer or cfg.teacher,
        "revision": cfg.teacher_revision,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "model_impl": cfg.model_impl,
        "seed": cfg.seed,
        "max_logprobs": max(cfg.top_k, 1),
        "logprobs_mode": "raw_logprobs",
        "dtype": "auto" if cfg.dtype == "auto" else cfg.dtype,
    }
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.teacher.startswith("pkg:"):
        raise GoldInputError(f"--backend vllm cannot load the packaged model {cfg.teacher}; use --backend hf, or "
                              f"pass a hub id / model folder.")
    return kwargs


def sampling_kwargs(request: TeacherRequest, *, top_k: int, temperature: float, top_p: float,
                    sampling_top_k: int, max_new_tokens: int, stop_ids: list[int]) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for one request."""
    if request.completion_ids is not None:
        return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k, "detokenize": False}
    return {
        "n": 1,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": sampling_top_k if sampling_top_k > 0 else -1,
        "seed": int(request.seed),
        "max_tokens": max_new_tokens,
        "logprobs": top_k if top_k > 0 else None,
        "stop_token_ids": list(stop_ids),
        "skip_special_tokens": False,
    }


def prompt_of(request: TeacherRequest) -> dict:
    """A TokensPrompt (plain dict): the prompt, plus the completion for score-only."""
    ids = list(request.prompt_ids) + list(request.completion_ids or [])
    return {"prompt_token_ids": ids}


def _value(entry) -> float:
    return float(getattr(entry, "logprob", entry))


def logprob_rows(ids: list[int], entries: list[dict | None], k: int, where: str):
    """(m,) actual log-probs and (m, K) top-k from vLLM's per-position {token_id: Logprob} dicts."""
    m = len(ids)
    token_lp = np.zeros(m, dtype=np.float32)
    topk_ids = np.zeros((m, k), dtype=np.int32)
    topk_lp = np.zeros((m, k), dtype=np.float32)
    for position, (token_id, entry) in enumerate(zip(ids, entries)):
        if entry is None or token_id not in entry:
            raise ValueError(f"{where}: vLLM returned no log-prob for token {position} (id {token_id}).")
        token_lp[position] = _value(entry[token_id])
        best = sorted(entry.items(), key=lambda item: -_value(item[1]))[:k]
        if len(best) < k:
            raise ValueError(f"{where}: vLLM returned {len(best)} log-probs at token {position}, fewer than --top-k "
                             f"{k}; raise max_logprobs.")
        topk_ids[position] = [token_id_ for token_id_, _ in best]
        topk_lp[position] = [_value(value) for _, value in best]
    return token_lp, topk_ids, topk_lp


def result_from_output(request: TeacherRequest, output, *, k: int, stop_ids: list[int]) -> TeacherResult:
    """TeacherResult of one vLLM RequestOutput."""
    where = f"Sample {request.sample_id}"
    if request.completion_ids is not None:
        ids = list(request.completion_ids)
        start = len(request.prompt_ids)
        entries = list(output.prompt_logprobs or [])[start : start + len(ids)]
        result = TeacherResult(completion_ids=ids, finish_reason="stop")
    else:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        entries = list(completion.logprobs or [None] * len(ids))
        finish = "stop" if completion.finish_reason == "stop" else "length"
        result = TeacherResult(completion_ids=ids, finish_reason=finish, completion_text=None)
        if finish == "stop" and (not ids or ids[-1] not in stop_ids):
            result.stats["stop_token_unscored"] = 1
    if k > 0:
        result.token_logprobs, result.topk_ids, result.topk_logprobs = logprob_rows(ids, entries, k, where)
    return result


class VLLMBackend:
    name = "vllm"

    def __init__(self, llm, *, top_k: int, stop_ids: list[int], sampling: dict):
        self.llm = llm
        self.top_k = top_k
        self.stop_ids = list(stop_ids)
        self.sampling = sampling

    @classmethod
    def from_config(cls, cfg, *, stop_ids: list[int]) -> "VLLMBackend":
        vllm = import_vllm()
        llm = vllm.LLM(**engine_kwargs(cfg))
        sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, sampling_top_k=cfg.sampling_top_k,
                        max_new_tokens=cfg.max_new_tokens)
        return cls(llm, top_k=cfg.top_k, stop_ids=stop_ids, sampling=sampling)

    def run(self, requests: list[TeacherRequest]) -> list[TeacherResult]:
        vllm = import_vllm()
        params = [vllm.SamplingParams(**sampling_kwargs(r, top_k=self.top_k, stop_ids=self.stop_ids,
                                                        **self.sampling)) for r in requests]
        outputs = self.llm.generate([prompt_of(r) for r in requests], params, use_tqdm=False)
        return [result_from_output(r, o, k=self.top_k, stop_ids=self.stop_ids) for r, o in zip(requests, outputs)]
