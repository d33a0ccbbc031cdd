"""transformers backend: batched generation (left padding) that records the teacher log-probs as it goes.

Generation is `models.generation.generate_seeded_with_logprobs` (the seeded sampler of on-policy rollouts): every
sample has its own random stream seeded from (seed, sample_id), so a resumed shard reproduces its rows and the
sample does not depend on which other prompts share its batch. Each step's raw logits are reduced on the spot
to the chosen token's log-prob and the top-K, so generation is the only forward pass.

`--score-only` (given completions) uses a teacher-forced scoring pass over [left-pad | prompt | completion |
right-pad]: all completions start at the same column, so `logits_to_keep` computes logits only at the C
completion positions (never (B, T, V) for the prompt). Both paths store the teacher's raw distribution
(log_softmax of the logits in float32: temperature 1, no filtering), equal within float noise (tested).
"""

from __future__ import annotations

import numpy as np
import torch

from gold_pipeline.errors import GoldInputError
from gold_pipeline.models.generation import SamplingSettings, generate_seeded, generate_seeded_with_logprobs
from gold_pipeline.teacher_cache.base import TeacherRequest, TeacherResult, topk_from_logprobs

SCORE_ELEMENT_BUDGET = 1 << 27   # logits elements (B_chunk * C * V) per scoring forward: 512 MiB of float32


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class HFBackend:
    """Teacher = a transformers causal LM in this process."""

    name = "hf"

    def __init__(
        self,
        model,
        *,
        top_k: int,
        stop_ids: list[int],
        pad_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        sampling_top_k: int = 0,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        max_context: int | None = None,
        device: str = "auto",
        single_pass: bool = True,
    ):
        """single_pass False: generate, then score the completions in a second forward pass (the former path,
        kept for benchmarks and equivalence tests; the stored values are the same)."""
        self.single_pass = single_pass
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.top_k = top_k
        self.stop_ids = list(dict.fromkeys(stop_ids))
        self.pad_id = pad_id
        self.temperature = temperature
        self.top_p = top_p
        self.sampling_top_k = sampling_top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        config_context = getattr(model.config, "max_position_embeddings", None)
        self.context_length = max_context or config_context or 2048
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        if top_k > self.vocab_size:
            raise GoldInputError(f"--top-k {top_k} exceeds the teacher's vocabulary size {self.vocab_size}.")

    # ---------------------------------------------------------------------------------------------------------
    def run(self, requests: list[TeacherRequest]) -> list[TeacherResult]:
        """Results in request order; batches are formed from prompts sorted by length (deterministic)."""
        order = sorted(range(len(requests)), key=lambda i: (len(requests[i].prompt_ids), i))
        results: list[TeacherResult | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch_idx = order[start : start + self.batch_size]
            batch = [requests[i] for i in batch_idx]
            for i, result in zip(batch_idx, self._run_batch(batch)):
                results[i] = result
        return results  # type: ignore[return-value]

    def _run_batch(self, batch: list[TeacherRequest]) -> list[TeacherResult]:
        if batch[0].completion_ids is None and self.top_k > 0 and self.single_pass:
            completions, finish, recorded = self.generate_with_logprobs(batch)
            return [TeacherResult(completion_ids=c, finish_reason=f, token_logprobs=lp.token_logprobs.numpy(),
                                  topk_ids=lp.topk_ids.numpy(), topk_logprobs=lp.topk_logprobs.numpy())
                    for c, f, lp in zip(completions, finish, recorded)]  # fmt: skip
        if batch[0].completion_ids is not None:
            completions = [list(r.completion_ids) for r in batch]
            finish = ["stop"] * len(batch)
        else:
            completions, finish = self.generate(batch)
        results = [TeacherResult(completion_ids=c, finish_reason=f) for c, f in zip(completions, finish)]
        if self.top_k > 0:
            scored = self.score([r.prompt_ids for r in batch], completions)
            for result, (token_lp, topk_ids, topk_lp) in zip(results, scored):
                result.token_logprobs, result.topk_ids, result.topk_logprobs = token_lp, topk_ids, topk_lp
        return results

    # ---------------------------------------------------------------------------------------------------------
    def sampling(self, batch_size: int) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.temperature, self.top_p, self.sampling_top_k,
                                batch_size=batch_size)  # fmt: skip

    def generate(self, batch: list[TeacherRequest]) -> tuple[list[list[int]], list[str]]:
        """Sample one completion per request; ids end with a stop id ("stop") or hit max_new_tokens ("length")."""
        return generate_seeded(self.model, [r.prompt_ids for r in batch], [r.seed for r in batch],
                               self.sampling(len(batch)), stop_ids=self.stop_ids, pad_id=self.pad_id)  # fmt: skip

    def generate_with_logprobs(self, batch: list[TeacherRequest]):
        """`generate` plus each completion's raw teacher log-probs recorded during generation:
        (ids, finish reasons, [CompletionLogprobs: (m,) token, (m, K) top-k ids and log-probs])."""
        return generate_seeded_with_logprobs(self.model, [r.prompt_ids for r in batch], [r.seed for r in batch],
                                             self.sampling(len(batch)), stop_ids=self.stop_ids, pad_id=self.pad_id,
                                             top_k=self.top_k)  # fmt: skip

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, prompts: list[list[int]], completions: list[list[int]]):
        """Teacher-forced log-probs of each completion: [(token_logprobs (m,), topk_ids (m,K), topk_logprobs (m,K))]."""
        out = []
        longest = max(len(c) for c in completions)
        rows_per_chunk = max(1, SCORE_ELEMENT_BUDGET // max(1, longest * self.vocab_size))
        for start in range(0, len(prompts), rows_per_chunk):
            out.extend(self._score_chunk(prompts[start : start + rows_per_chunk],
                                         completions[start : start + rows_per_chunk]))
        return out

    def _score_chunk(self, prompts: list[list[int]], completions: list[list[int]]):
        prompt_width = max(len(p) for p in prompts)
        completion_width = max(max(len(c) for c in completions), 1)
        batch = len(prompts)
        input_ids = torch.full((batch, prompt_width + completion_width), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            left = prompt_width - len(prompt)
            input_ids[row, left:prompt_width] = torch.tensor(prompt)
            input_ids[row, prompt_width : prompt_width + len(completion)] = torch.tensor(completion, dtype=torch.long)
            attention_mask[row, left : prompt_width + len(completion)] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)                          # (B, T)
        # the logit row before a token predicts it: columns P-1 .. P+C-2 predict completion tokens 0 .. C-1
        keep = torch.arange(prompt_width - 1, prompt_width + completion_width - 1, device=self.device)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits                                                                              # (B, C, V)
        results = []
        for row, completion in enumerate(completions):
            m = len(completion)
            if m == 0:
                empty_k = (0, self.top_k)
                results.append((np.zeros(0, np.float32), np.zeros(empty_k, np.int32), np.zeros(empty_k, np.float32)))
                continue
            logprobs = torch.log_softmax(logits[row, :m].float(), dim=-1)                     # (m, V)
            ids = torch.tensor(completion, device=logprobs.device)
            token_lp, topk_ids, topk_lp = topk_from_logprobs(logprobs, ids, self.top_k)
            results.append((token_lp.cpu().numpy(), topk_ids.cpu().numpy(), topk_lp.cpu().numpy()))
        return results

