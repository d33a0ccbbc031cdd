"""Sampling with transformers `generate`, seeded per sample: the one generation path of gold.

Both the teacher cache (`gold teacher-cache --backend hf`) and on-policy rollouts in training sample here.
`generate` runs in greedy mode behind a logits processor that applies temperature / top-k / top-p and adds
Gumbel noise drawn from a per-sample generator (Gumbel-max = exact sampling). Every sample has its own random
stream, so a sample depends only on its seed: not on the batch it shares, the global RNG, or a resume.

`generate_seeded_with_logprobs` samples the same ids and also records, step by step, the model's raw
next-token distribution (temperature 1, unfiltered) reduced to the chosen token's log-prob and the top-K: the
teacher cache stores these instead of scoring the completions in a second forward pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from gold_pipeline.models.sharding import synced_generation


def sample_seed(seed: int, key: str) -> int:
    """Deterministic 63-bit seed of one sample from the run seed and a key naming the sample (its sample id, or
    for a rollout its step, process and position): same (seed, key) -> same completion."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def cut_at_stop(new_ids: list[int], stop_ids, limit: int | None = None) -> tuple[list[int], str]:
    """(ids up to and including the first stop id, "stop"), else (the first `limit` ids, "length")."""
    stops = set(stop_ids)
    window = new_ids if limit is None else new_ids[:limit]
    for position, token in enumerate(window):
        if token in stops:
            return list(new_ids[: position + 1]), "stop"
    return list(window), "length"


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (TRL's temperature / top_p / top_k names); temperature 0 = greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    batch_size: int = 8  # prompts per generate call


def filter_logprobs(logprobs: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the smallest top-p nucleus. logprobs: (B, V)."""
    if top_k and top_k < logprobs.shape[-1]:
        kth = torch.topk(logprobs, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logprobs = logprobs.masked_fill(logprobs < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)  # (B, V)
        mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()  # exclusive cumulative mass
        remove_sorted = mass_before >= top_p  # the first token always stays
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logprobs = logprobs.masked_fill(remove, float("-inf"))
    return logprobs


class SeededSampler(LogitsProcessor):
    """Per-row sampling for greedy `generate`: filtered log-probs + per-row Gumbel noise (argmax = a sample).

    seeds: one per batch row. temperature 0 -> plain greedy (no noise).
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0, top_k: int = 0):
        self.generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: (B, V) next-token logits
        if self.temperature == 0:
            return scores
        logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        logprobs = filter_logprobs(logprobs, top_k=self.top_k, top_p=self.top_p)
        vocab = logprobs.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators])  # (B, V)
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-12, 1.0 - 1e-7)))  # (B, V)
        return logprobs + gumbel.to(logprobs.device)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, P), attention_mask (B, P)) of prompts left-padded to the longest one."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


class RawLogprobRecorder(LogitsProcessor):
    """Records the model's raw next-token log-probs during `generate`, reduced per step to what is stored.

    The raw logits are taken by a forward hook on the model (`capture`): the last position of each forward's
    logits, exactly what `generate` reads, before any logits processor. (A processor alone could see altered
    scores: `generate` runs the processors that the model's own generation_config asks for, such as a hub
    repetition penalty, before the ones passed in.) `__call__` runs once per generated token: it reduces the
    latest raw logits to log_softmax in float32 -> top-K, and keeps that step's (B, V) log-probs only until the
    next call, whose input_ids end with the token chosen from them. Memory: (B, V) + steps x (B, K).
    """

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.latest_logits: torch.Tensor | None = None    # (B, V) raw logits of the latest forward
        self.pending: torch.Tensor | None = None          # (B, V) float32 log-probs of the latest step
        self.token_logprobs: list[torch.Tensor] = []      # per step (B,), for the steps before `pending`
        self.topk_ids: list[torch.Tensor] = []            # per step (B, K) int32
        self.topk_logprobs: list[torch.Tensor] = []       # per step (B, K) float32, descending

    def capture(self, module, args, output) -> None:
        self.latest_logits = output.logits[:, -1].detach().to(torch.float32, copy=True)   # (B, V)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (B, P + steps so far), ending with the token chosen at the previous step
        if self.latest_logits is None:
            raise RuntimeError("RawLogprobRecorder saw no forward pass: register `capture` as a forward hook.")
        if self.pending is not None:
            self.token_logprobs.append(self.pending.gather(-1, input_ids[:, -1:].to(self.pending.device))[:, 0])
        self.pending = torch.log_softmax(self.latest_logits, dim=-1)                       # (B, V)
        values, indices = torch.topk(self.pending, self.top_k, dim=-1, largest=True, sorted=True)  # (B, K)
        self.topk_logprobs.append(values)
        self.topk_ids.append(indices.to(torch.int32))
        return scores

    def finish(self, new_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """new_ids: (B, S) generated ids -> (token_logprobs (B, S), topk_ids (B, S, K), topk_logprobs (B, S, K)).

        `generate` may run one step more than it returns (a deferred stop check); that step is dropped."""
        steps = new_ids.shape[1]
        if len(self.topk_ids) < steps:
            raise RuntimeError(f"recorded {len(self.topk_ids)} generation steps for {steps} generated tokens.")
        token_logprobs = self.token_logprobs[:steps]
        if len(token_logprobs) < steps:  # the last returned token was chosen from `pending`
            last = new_ids[:, steps - 1 :].to(self.pending.device)                        # (B, 1)
            token_logprobs = token_logprobs + [self.pending.gather(-1, last)[:, 0]]
        batch = new_ids.shape[0]
        if steps == 0:
            return (torch.zeros(batch, 0), torch.zeros(batch, 0, self.top_k, dtype=torch.int32),
                    torch.zeros(batch, 0, self.top_k))  # fmt: skip
        return (torch.stack(token_logprobs, dim=1).cpu(),                                  # (B, S)
                torch.stack(self.topk_ids[:steps], dim=1).cpu(),                            # (B, S, K)
                torch.stack(self.topk_logprobs[:steps], dim=1).cpu())  # fmt: skip


@dataclass(frozen=True)
class CompletionLogprobs:
    """The model's raw (temperature 1, unfiltered) log-probs along one completion: m tokens, K = top-k."""

    token_logprobs: torch.Tensor  # (m,) float32, log-prob of each completion id
    topk_ids: torch.Tensor        # (m, K) int32, most likely first
    topk_logprobs: torch.Tensor   # (m, K) float32, descending


@torch.no_grad()
def generate_seeded(model, prompts: list[list[int]], seeds: list[int], sampling: SamplingSettings, *,
                    stop_ids: list[int], pad_id: int) -> tuple[list[list[int]], list[str]]:
    """One sampled completion per prompt, in chunks of `sampling.batch_size`: (ids, finish reasons). The ids end
    with a stop id ("stop") or hold max_new_tokens ids ("length"). The model is put in eval mode meanwhile."""
    completions, finish, _ = _generate(model, prompts, seeds, sampling, stop_ids=stop_ids, pad_id=pad_id, top_k=None)
    return completions, finish


@torch.no_grad()
def generate_seeded_with_logprobs(model, prompts: list[list[int]], seeds: list[int], sampling: SamplingSettings, *,
                                  stop_ids: list[int], pad_id: int, top_k: int,
                                  ) -> tuple[list[list[int]], list[str], list[CompletionLogprobs]]:  # fmt: skip
    """`generate_seeded` (the same ids) plus the raw log-probs of every kept token, stop id included, recorded
    during generation: (ids, finish reasons, log-probs), one per prompt. top_k >= 0 (0: token log-probs only)."""
    if top_k < 0:
        raise ValueError(f"generate_seeded_with_logprobs needs top_k >= 0, got {top_k}.")
    return _generate(model, prompts, seeds, sampling, stop_ids=stop_ids, pad_id=pad_id, top_k=top_k)


def _generate(model, prompts, seeds, sampling: SamplingSettings, *, stop_ids, pad_id, top_k: int | None):
    """The chunked generate loop of both public functions; top_k None: no log-prob recording."""
    if len(seeds) != len(prompts):
        raise ValueError(f"generate_seeded got {len(prompts)} prompts and {len(seeds)} seeds: pass one seed each.")
    device = next(model.parameters()).device
    stop_ids = list(dict.fromkeys(stop_ids))
    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False,
                              eos_token_id=stop_ids or None, pad_token_id=pad_id)  # fmt: skip
    completions: list[list[int]] = []
    finish: list[str] = []
    logprobs: list[CompletionLogprobs] = []
    was_training = model.training
    synced = synced_generation(model)  # a sharded model: every rank steps until all finished
    model.eval()
    try:
        for start in range(0, len(prompts), max(1, sampling.batch_size)):
            chunk = prompts[start : start + max(1, sampling.batch_size)]
            input_ids, attention_mask = left_padded(chunk, pad_id)
            sampler = SeededSampler(seeds[start : start + len(chunk)], sampling.temperature, sampling.top_p,
                                    sampling.top_k)  # fmt: skip
            processors = [sampler]
            recorder = None
            if top_k is not None:
                recorder = RawLogprobRecorder(top_k)
                processors = [recorder, sampler]
                hook = model.register_forward_hook(recorder.capture)
            try:
                sequences = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                           generation_config=config, logits_processor=LogitsProcessorList(processors),
                                           use_cache=True, synced_gpus=synced)  # (B, P + new)
            finally:
                if recorder is not None:
                    hook.remove()
            new_ids = sequences[:, input_ids.shape[1] :]                                   # (B, S)
            if recorder is not None:
                token_lp, topk_ids, topk_lp = recorder.finish(new_ids)                     # (B, S), (B, S, K) x 2
            for row, ids in enumerate(new_ids.tolist()):
                cut, reason = cut_at_stop(ids, stop_ids, sampling.max_new_tokens)
                completions.append(cut)
                finish.append(reason)
                if recorder is not None:
                    m = len(cut)  # positions after the stop are padding: never kept
                    logprobs.append(CompletionLogprobs(token_lp[row, :m], topk_ids[row, :m], topk_lp[row, :m]))
    finally:
        model.train(was_training)
    return completions, finish, logprobs
