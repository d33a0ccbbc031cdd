"""On-policy rollouts: the student samples completions, they are aligned online with the alignment code
(sampled ids -> completion text -> the other side's tokenization -> align_completion), and the teacher
scores them in the loss step. Sequence-level KD uses the same path with the roles swapped (the teacher
samples). The window builder decides, per slice of the optimizer window, on- or off-policy.

Generation goes through a `GenerationBackend` (transformers `generate` here); the vLLM backend plugs in at
`make_generation_backend` (the vLLM issue).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from gold_pipeline.training.data import TokenizerPair


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (TRL's temperature/top_p/top_k, max_completion_length)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    batch_size: int  # prompts per generate call

    @classmethod
    def from_args(cls, args) -> SamplingSettings:
        return cls(
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            batch_size=max(1, args.per_device_train_batch_size * args.gradient_accumulation_steps),
        )


class GenerationBackend(Protocol):
    def generate(self, model, prompts: list[list[int]]) -> list[list[int]]:
        """Sampled completion ids per prompt, cut after the first stop id (which is kept)."""


class HFGenerateBackend:
    """Samples with `model.generate` (left-padded prompts, KV cache, sampling settings of the config)."""

    def __init__(self, sampling: SamplingSettings, *, stop_ids: list[int], pad_id: int):
        self.sampling = sampling
        self.stop_ids = sorted(set(stop_ids))
        self.pad_id = pad_id

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]]) -> list[list[int]]:
        out: list[list[int]] = []
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(prompts), self.sampling.batch_size):
                out.extend(self._generate_chunk(model, prompts[start : start + self.sampling.batch_size]))
        finally:
            model.train(was_training)
        return out

    def _generate_chunk(self, model, prompts: list[list[int]]) -> list[list[int]]:
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, P)
        attention_mask = torch.zeros_like(input_ids)
        for b, prompt in enumerate(prompts):
            input_ids[b, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[b, width - len(prompt) :] = 1
        s = self.sampling
        sequences = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else None,
            max_new_tokens=s.max_new_tokens,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.pad_id,
            use_cache=True,
        )  # (B, P + new)
        completions = sequences[:, width:].tolist()
        return [cut_at_stop(c, self.stop_ids) for c in completions]


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Ids up to and including the first stop id (generate pads after it)."""
    stops = set(stop_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


def make_generation_backend(args, *, stop_ids: list[int], pad_id: int) -> GenerationBackend:
    """The student's generation backend. vLLM (`use_vllm=True`) is the seam for the vLLM issue."""
    if args.use_vllm:
        raise NotImplementedError(
            "GOLDConfig.use_vllm=True: the vLLM generation backend is not part of this build (it needs a GPU and "
            "the optional `vllm` extra); set use_vllm=False to sample with transformers generate."
        )
    return HFGenerateBackend(SamplingSettings.from_args(args), stop_ids=stop_ids, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------------------
# Online alignment of sampled completions.
# ----------------------------------------------------------------------------------------------------------


def valid_utf8_prefix(data: bytes) -> str:
    """The longest prefix of `data` that is valid UTF-8, decoded (a sample may stop inside a character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        return data[: error.start].decode("utf-8", errors="replace")


def sampled_completion_text(table, ids: list[int]) -> str:
    """Text of sampled ids: the longest valid UTF-8 prefix of their bytes (alignment.completion_text_from_ids)."""
    from gold_pipeline.alignment import completion_text_from_ids

    return completion_text_from_ids(table, np.asarray(ids, dtype=np.int64))[0]


def align_sampled(pair: TokenizerPair, row: dict, sampled_ids: list[int], *, sampler: str,
                  max_completion_length: int) -> dict:
    """A new row for `row`'s prompts with a completion sampled by `sampler` ("student" or "teacher").

    The sampler's ids are kept as sampled (stop id normalized to that side's end-of-turn ids); the other side
    tokenizes the decoded text on its own; bytes past a mismatch or an incomplete UTF-8 tail get group -1.
    """
    from gold_pipeline.alignment import align_completion
    from gold_pipeline.tokenization import encode_completion

    other = "teacher" if sampler == "student" else "student"
    tables = {"student": pair.student_table, "teacher": pair.teacher_table}
    tokenizers = {"student": pair.student_tokenizer, "teacher": pair.teacher_tokenizer}
    eots = {"student": pair.student_eot_ids, "teacher": pair.teacher_eot_ids}
    stop_ids = set(eots[sampler]) | _eos_ids(tokenizers[sampler])
    stopped = bool(sampled_ids) and sampled_ids[-1] in stop_ids
    own_ids = list(sampled_ids[:-1] if stopped else sampled_ids)
    text = sampled_completion_text(tables[sampler], own_ids)
    other_ids = list(encode_completion(tokenizers[other], text))
    room = max_completion_length - (len(eots[other]) if stopped else 0)
    if len(other_ids) > room:
        other_ids, stopped = other_ids[:max_completion_length], False
    ids = {sampler: own_ids, other: other_ids}
    alignment = align_completion(
        np.asarray(ids["student"], dtype=np.int64), np.asarray(ids["teacher"], dtype=np.int64),
        pair.student_table, pair.teacher_table, text=text,
    )
    groups = {"student": [int(g) for g in alignment.student_group_ids],
              "teacher": [int(g) for g in alignment.teacher_group_ids]}
    if stopped:
        for side in ("student", "teacher"):
            ids[side] = ids[side] + eots[side]
            groups[side] = groups[side] + [-1] * len(eots[side])
    return {
        "sample_id": row.get("sample_id", ""),
        "completion_text": text,
        "student_prompt_ids": list(row["student_prompt_ids"]),
        "teacher_prompt_ids": list(row["teacher_prompt_ids"]),
        "student_completion_ids": ids["student"],
        "teacher_completion_ids": ids["teacher"],
        "student_group_ids": groups["student"],
        "teacher_group_ids": groups["teacher"],
        "num_groups": int(alignment.num_groups),
        "status": alignment.status,
        "stopped": stopped,
        "excluded_student_tokens": int(alignment.excluded_student_tokens),
        "excluded_teacher_tokens": int(alignment.excluded_teacher_tokens),
    }


def _eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        return {eos}
    return set(eos or [])


def stop_ids_for(tokenizer, eot_ids: list[int]) -> list[int]:
    """Ids that end a sampled completion: the first end-of-turn id and EOS."""
    return sorted(({eot_ids[0]} if eot_ids else set()) | _eos_ids(tokenizer))


# ----------------------------------------------------------------------------------------------------------
# The on/off-policy draw.
# ----------------------------------------------------------------------------------------------------------


def on_policy_flags(lmbda: float, *, seed: int, global_step: int, num_slices: int) -> list[bool]:
    """One draw per slice of the optimizer window, from (seed, global step, slice) only: every process gets
    the same flags without communication, and a resumed run repeats the draws of an uninterrupted one."""
    if lmbda <= 0.0:
        return [False] * num_slices
    if lmbda >= 1.0:
        return [True] * num_slices
    return [random.Random(f"gold-policy:{seed}:{global_step}:{i}").random() < lmbda for i in range(num_slices)]


def rollout_slices(
    slices: list[list[dict]],
    which: list[int],
    *,
    model,
    backend: GenerationBackend,
    pair: TokenizerPair,
    sampler: str,
    max_completion_length: int,
) -> tuple[list[list[dict]], int]:
    """Replace the rows of slices `which` with completions sampled by `model` (one batched generate call for
    the whole window, as TRL buffers one window of generations). Returns (slices, generated tokens)."""
    if not which:
        return slices, 0
    prompts = [row[f"{sampler}_prompt_ids"] for i in which for row in slices[i]]
    sampled = backend.generate(model, prompts)
    out = list(slices)
    cursor = 0
    for i in which:
        new_rows = []
        for row in slices[i]:
            new_rows.append(align_sampled(pair, row, sampled[cursor], sampler=sampler,
                                          max_completion_length=max_completion_length))
            cursor += 1
        out[i] = new_rows
    return out, sum(len(s) for s in sampled)
