"""On-policy rollouts: the student samples completions, they are aligned online with the alignment code
(sampled ids -> completion text -> the other side's tokenization -> align_completion), and the teacher
scores them in the loss step. Sequence-level KD uses the same path with the roles swapped (the teacher
samples). The window builder decides, per slice of the optimizer window, on- or off-policy.

Generation goes through a `GenerationBackend`; the transformers one samples with `models.generation` (the same
seeded sampler as the teacher cache): every rollout has its own seed from (run seed, global step, process,
position in the window), so a resumed run repeats the rollouts of an uninterrupted one and a rollout does not
depend on the global RNG. The vLLM backend plugs in at `make_generation_backend` (the vLLM issue).
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np

from gold_pipeline.align.groups import align_completion, completion_text_from_ids
from gold_pipeline.align.row import cut_at_group, student_byte_lengths
from gold_pipeline.errors import GoldInputError
from gold_pipeline.models.generation import SamplingSettings, generate_seeded, sample_seed
from gold_pipeline.text.encode import encode_completion
from gold_pipeline.text.pair import TokenizerPair


def sampling_from_args(args) -> SamplingSettings:
    """How completions are sampled, from a GOLDConfig (TRL's temperature/top_p/top_k, max_completion_length)."""
    return SamplingSettings(
        max_new_tokens=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        batch_size=max(1, args.per_device_train_batch_size * args.gradient_accumulation_steps),
    )


def rollout_seeds(seed: int, *, sampler: str, global_step: int, process: int, count: int) -> list[int]:
    """One seed per rollout of an optimizer window: from (seed, sampler, global step, process, position) only."""
    return [sample_seed(seed, f"rollout:{sampler}:{global_step}:{process}:{position}") for position in range(count)]


class GenerationBackend(Protocol):
    def generate(self, model, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """Sampled completion ids per prompt (one seed each), cut after the first stop id (which is kept)."""


class HFGenerateBackend:
    """Samples with `model.generate` through models.generation.generate_seeded (left-padded prompts, KV cache)."""

    def __init__(self, sampling: SamplingSettings, *, stop_ids: list[int], pad_id: int):
        self.sampling = sampling
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id

    def generate(self, model, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        completions, _ = generate_seeded(model, prompts, seeds, self.sampling, stop_ids=self.stop_ids,
                                         pad_id=self.pad_id)  # fmt: skip
        return completions


def make_generation_backend(args, *, stop_ids: list[int], pad_id: int) -> GenerationBackend:
    """The student's generation backend. vLLM (`use_vllm=True`) is the seam for the vLLM issue."""
    if args.use_vllm:
        raise GoldInputError(
            "GOLDConfig.use_vllm=True: the vLLM generation backend is not part of this build (it needs a GPU and "
            "the optional `vllm` extra); set use_vllm=False to sample with transformers generate."
        )
    return HFGenerateBackend(sampling_from_args(args), stop_ids=stop_ids, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------------------
# Online alignment of sampled completions.
# ----------------------------------------------------------------------------------------------------------


def align_sampled(pair: TokenizerPair, row: dict, sampled_ids: list[int], *, sampler: str,
                  max_completion_length: int) -> dict:
    """A new row for `row`'s prompts with a completion sampled by `sampler` ("student" or "teacher").

    The sampler's ids are kept as sampled (stop id normalized to that side's end-of-turn ids); the text is the
    longest valid UTF-8 prefix of their bytes, and the other side tokenizes it on its own; bytes past a mismatch
    or an incomplete UTF-8 tail get group -1. When the other side needs more than max_completion_length tokens,
    both sides are cut by align.row.cut_at_group (the same rule as `gold align` and the datasets).
    """
    other = "teacher" if sampler == "student" else "student"
    own, theirs = pair.side(sampler), pair.side(other)
    stopped = bool(sampled_ids) and sampled_ids[-1] in (set(own.eot_ids.tolist()) | set(own.stop_ids))
    own_ids = list(sampled_ids[:-1] if stopped else sampled_ids)
    text = completion_text_from_ids(own.table, np.asarray(own_ids, dtype=np.int64))[0]
    # one tokenizer on both sides: the other model scores exactly the sampled ids (a sample need not be the
    # canonical tokenization of its text, and token-level losses need both sides to have the same tokens)
    other_ids = list(own_ids) if pair.same_tokenizer else list(encode_completion(theirs.tokenizer, text))
    ids = {sampler: own_ids, other: other_ids}
    alignment = align_completion(np.asarray(ids["student"], dtype=np.int64), np.asarray(ids["teacher"], dtype=np.int64),
                                 pair.student_table, pair.teacher_table, text=text)  # fmt: skip
    groups = {"student": alignment.student_group_ids.astype(np.int64).tolist(),
              "teacher": alignment.teacher_group_ids.astype(np.int64).tolist()}
    num_groups, status = int(alignment.num_groups), alignment.status
    excluded = (int(alignment.excluded_student_tokens), int(alignment.excluded_teacher_tokens))
    room = max_completion_length - (len(theirs.eot_ids) if stopped else 0)
    if len(ids[other]) > room:
        text_bytes = text.encode("utf-8")
        cut = cut_at_group(alignment.student_group_ids, alignment.teacher_group_ids, num_groups,
                           student_byte_lengths(pair.student_table, ids["student"], text), text_bytes,
                           max_completion_length, max_completion_length)  # fmt: skip
        for side, kept in (("student", cut.student_tokens), ("teacher", cut.teacher_tokens)):
            ids[side], groups[side] = ids[side][:kept], groups[side][:kept]
        text = text_bytes[: cut.text_bytes].decode("utf-8")
        num_groups, status, excluded, stopped = cut.groups, "ok", (0, 0), False
    if stopped:
        for side in ("student", "teacher"):
            eot = pair.side(side).eot_ids.tolist()
            ids[side] = ids[side] + eot
            groups[side] = groups[side] + [-1] * len(eot)
    return {
        "sample_id": row.get("sample_id", ""),
        "completion_text": text,
        "student_prompt_ids": list(row["student_prompt_ids"]),
        "teacher_prompt_ids": list(row["teacher_prompt_ids"]),
        "student_completion_ids": ids["student"],
        "teacher_completion_ids": ids["teacher"],
        "student_group_ids": groups["student"],
        "teacher_group_ids": groups["teacher"],
        "num_groups": num_groups,
        "status": status,
        "stopped": stopped,
        "excluded_student_tokens": excluded[0],
        "excluded_teacher_tokens": excluded[1],
    }


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
    seeds: list[int],
) -> tuple[list[list[dict]], int]:
    """Replace the rows of slices `which` with completions sampled by `model` (one batched generate call for
    the whole window, as TRL buffers one window of generations); seeds: one per row of those slices, in order
    (rollout_seeds). Returns (slices, generated tokens)."""
    if not which:
        return slices, 0
    prompts = [row[f"{sampler}_prompt_ids"] for i in which for row in slices[i]]
    sampled = backend.generate(model, prompts, seeds[: len(prompts)])
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
