"""`gold teacher-cache`: prompts in, teacher completions + per-token top-K log-probs out (DESIGN.md §5).

Work plan (identical in every process, so ranks agree without talking):
  1. read the dataset, render each prompt with the teacher's chat template, validate it (counted skips or errors);
  2. the valid prompts, in dataset order, are cut into shards of `rows_per_shard` prompts; shard s holds the
     `num_generations` samples of each of its prompts and belongs to rank s % world_size;
  3. a rank runs the backend on each of its shards that has no completion marker and writes it atomically
     (ShardWriter); every sample is seeded from (seed, sample_id), so a redone shard reproduces its rows;
  4. rank 0 writes manifest.json last, after all shards are finished.

Kill at any point + `--resume` = the same rows as an uninterrupted run: a shard is either whole (marker) or redone.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gold_pipeline.data.ragged import rows_to_arrow, starts_of, to_arrow
from gold_pipeline.data.schemas import TEACHER_SCHEMA
from gold_pipeline.data.shards import ShardWriter, check_run_identity, prepare_output_dir
from gold_pipeline.data.shards import sample_id as make_sample_id
from gold_pipeline.errors import (
    BackendUnavailable,
    GoldInputError,
    GoldRuntimeError,
    StageTimeoutError,
    WorkerFailedError,
)
from gold_pipeline.models.generation import sample_seed
from gold_pipeline.teacher_cache.base import TeacherRequest, TeacherResult
from gold_pipeline.teacher_cache.config import TeacherCacheConfig
from gold_pipeline.text.pair import TokenizerSide, pad_token_id, stop_token_ids, tokenizer_record

SKIP_HINT = "Or pass --skip-invalid to skip such rows (they are counted in the manifest)."
# Test hook: seconds to sleep after each written shard, so a test can kill a worker mid-run.
_SHARD_DELAY_ENV = "GOLD_TEACHER_CACHE_TEST_SHARD_DELAY"


@dataclass
class PromptItem:
    """One valid prompt of the dataset (before multiplying by num_generations)."""

    row_index: int
    generation_base: int                      # first generation index of this prompt (duplicates of a prompt shift it)
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    completion_text: str | None               # score-only: the dataset's completion
    completion_ids: list[int] | None          # score-only: its teacher ids (+ end-of-turn ids)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer-side helpers
# --------------------------------------------------------------------------------------------------------------


def load_teacher_tokenizer(cfg: TeacherCacheConfig):
    from gold_pipeline.models.loading import model_tokenizer_name
    from gold_pipeline.text.tokenizers import load_tokenizer

    template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
    name = cfg.teacher_tokenizer or model_tokenizer_name(cfg.teacher)
    revision = cfg.teacher_revision if cfg.teacher_tokenizer is None and not name.startswith("pkg:") else None
    return load_tokenizer(name, revision=revision, chat_template=template)


def teacher_stop_ids(tokenizer) -> list[int]:
    """Generation stops at the first end-of-turn id of the chat template or at EOS (text.pair.stop_token_ids);
    a tokenizer with neither is refused."""
    ids = stop_token_ids(tokenizer)
    if not ids:
        raise GoldInputError("The teacher tokenizer has neither an end-of-turn token nor an EOS token: generation "
                             "could never stop. Pass a --chat-template or a tokenizer with an EOS token.")
    return ids


def check_prompt(messages: list[dict[str, str]]) -> str | None:
    """Reason a prompt cannot be used, or None. (Structural checks are done by sources.iter_examples.)"""
    if not any(m["role"] == "user" for m in messages):
        return "no_user_turn"
    if not any(m["content"].strip() for m in messages):
        return "empty_prompt"
    return None


REASON_TEXT = {
    "no_user_turn": "has no user message; the teacher needs a user turn to answer. Add one",
    "empty_prompt": "has only empty message contents. Give the prompt some text",
    "prompt_too_long": "is too long for the teacher's context",
    "empty_completion": "has an empty completion to score. Give a completion text",
}


# --------------------------------------------------------------------------------------------------------------
# The work plan
# --------------------------------------------------------------------------------------------------------------


def plan_prompts(cfg: TeacherCacheConfig, tokenizer, context_length: int | None) -> tuple[list[PromptItem], dict]:
    """Valid prompts in dataset order and the counts of skipped rows per reason (errors unless skip_invalid)."""
    from gold_pipeline.data.sources import iter_examples
    from gold_pipeline.text.encode import encode_completion, end_of_turn_ids, render_prompt_ids

    invalid: dict[str, int] = {}
    items: list[PromptItem] = []
    eot = list(end_of_turn_ids(tokenizer))

    def reject(row_index: int, reason: str, detail: str = "") -> None:
        if not cfg.skip_invalid:
            raise GoldInputError(f"Row {row_index} of {cfg.dataset}: the prompt {REASON_TEXT[reason]}{detail}. "
                                 f"{SKIP_HINT}")
        invalid[reason] = invalid.get(reason, 0) + 1

    examples = iter_examples(cfg.dataset, split=cfg.split, skip_invalid=cfg.skip_invalid,
                             require_completion=cfg.score_only, invalid_counts=invalid)
    for example in examples:
        if cfg.max_examples is not None and example.row_index >= cfg.max_examples:
            break
        reason = check_prompt(example.prompt_messages)
        if reason:
            reject(example.row_index, reason)
            continue
        prompt_ids = list(render_prompt_ids(tokenizer, example.prompt_messages))
        completion_ids = None
        if cfg.score_only:
            if not example.completion_text:
                reject(example.row_index, "empty_completion")
                continue
            completion_ids = list(encode_completion(tokenizer, example.completion_text)) + eot
        needed = len(prompt_ids) + (len(completion_ids) if completion_ids is not None else cfg.max_new_tokens)
        if context_length is not None and needed > context_length:
            what = "completion" if cfg.score_only else f"--max-new-tokens {cfg.max_new_tokens}"
            reject(example.row_index, "prompt_too_long",
                   f" ({len(prompt_ids)} prompt tokens + {what} = {needed} > {context_length}; shorten it, lower "
                   f"--max-new-tokens or raise --max-context if the model allows)")
            continue
        items.append(PromptItem(example.row_index, example.generation_index * cfg.num_generations,
                                example.prompt_messages, prompt_ids, example.completion_text, completion_ids))
    return items, invalid


def shard_ranges(num_prompts: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows_per_shard, num_prompts)) for start in range(0, num_prompts, rows_per_shard)]


def build_requests(cfg: TeacherCacheConfig, tokenizer, items: list[PromptItem]):
    """[(item, generation_index, TeacherRequest)] for every sample of these prompts."""
    out = []
    for item in items:
        for g in range(cfg.num_generations):
            generation_index = item.generation_base + g
            sid = make_sample_id(item.messages, generation_index)
            request = TeacherRequest(
                sample_id=sid,
                prompt_ids=item.prompt_ids,
                seed=sample_seed(cfg.seed, sid),
                completion_ids=item.completion_ids,
                prompt_text=None,
            )
            out.append((item, generation_index, request))
    return out


# --------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------


def completion_text_of(tokenizer, result: TeacherResult, stop_ids: set[int]) -> str:
    """The decoded completion without the final stop id; special tokens inside the text are kept as text."""
    ids = result.completion_ids
    if result.finish_reason == "stop" and ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def rows_to_table(rows: list[dict[str, Any]], top_k: int) -> pa.Table:
    """Build the TEACHER_SCHEMA table column-wise from numpy (no per-float Python objects); top-k log-probs are
    cast to the schema's type (float16: 2 bytes per entry keeps K = 64 under 400 bytes per teacher token)."""
    n = len(rows)
    arrays: dict[str, pa.Array] = {}
    for name in ("sample_id", "row_index", "generation_index", "messages", "prompt_text", "completion_text",
                 "finish_reason"):
        arrays[name] = pa.array([r[name] for r in rows], type=TEACHER_SCHEMA.field(name).type)
    for name in ("teacher_prompt_ids", "teacher_completion_ids"):
        arrays[name] = rows_to_arrow([np.asarray(r[name], dtype=np.int32) for r in rows],
                                     TEACHER_SCHEMA.field(name).type)
    if top_k == 0 or n == 0:
        for name in ("teacher_token_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
            arrays[name] = pa.nulls(n, TEACHER_SCHEMA.field(name).type)
    else:
        starts = starts_of([len(r["teacher_completion_ids"]) for r in rows])  # (R+1,)
        for name in ("teacher_token_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
            per_token = name == "teacher_token_logprobs"  # (n,) per row, the top-k columns (n, K)
            values = np.concatenate([np.asarray(r[name]) if per_token else np.asarray(r[name]).reshape(len(r[name]), top_k)
                                     for r in rows])  # (N,) or (N, K)
            arrays[name] = to_arrow(values, starts, TEACHER_SCHEMA.field(name).type)
    return pa.Table.from_arrays([arrays[field.name] for field in TEACHER_SCHEMA], schema=TEACHER_SCHEMA)


def make_row(item: PromptItem, generation_index: int, request: TeacherRequest, result: TeacherResult,
             tokenizer, stop_ids: set[int], top_k: int) -> dict[str, Any]:
    text = result.completion_text
    if text is None:
        text = item.completion_text if request.completion_ids is not None else \
            completion_text_of(tokenizer, result, stop_ids)
    m = len(result.completion_ids)
    if top_k:
        for name, value in (("token_logprobs", result.token_logprobs), ("topk_logprobs", result.topk_logprobs)):
            if value is None or len(value) != m:
                raise GoldRuntimeError(f"Backend returned {name} of length {None if value is None else len(value)} "
                                   f"for {m} completion tokens (sample {request.sample_id}).")
            if np.isnan(value).any() or np.isposinf(value).any():
                raise GoldRuntimeError(
                    f"The teacher produced NaN/inf log-probs for sample {request.sample_id} (row {item.row_index}): "
                    f"the model overflows in this dtype; rerun with --dtype float32 (or bfloat16)."
                )
    return {
        "sample_id": request.sample_id,
        "row_index": item.row_index,
        "generation_index": generation_index,
        "messages": item.messages,
        "prompt_text": tokenizer.decode(item.prompt_ids, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False),
        "completion_text": text,
        "teacher_prompt_ids": item.prompt_ids,
        "teacher_completion_ids": result.completion_ids,
        "teacher_token_logprobs": result.token_logprobs,
        "teacher_topk_ids": result.topk_ids,
        "teacher_topk_logprobs": result.topk_logprobs,
        "finish_reason": result.finish_reason,
    }


def bytes_per_teacher_token(top_k: int, logprobs_bytes: int = 2) -> int:
    """Uncompressed Arrow payload per completion token: id (4) + token log-prob (4) + K * (id 4 + log-prob)."""
    return 4 + 4 + top_k * (4 + logprobs_bytes) if top_k else 4


# --------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------


def context_length_for(cfg: TeacherCacheConfig, model=None) -> int | None:
    """The context limit used to reject too-long prompts (None: unknown, the server decides)."""
    if cfg.max_context is not None:
        return cfg.max_context
    if model is not None:
        config = getattr(model.config, "text_config", model.config)
        return getattr(config, "max_position_embeddings", None)
    if cfg.backend == "vllm" and cfg.max_model_len is not None:
        return cfg.max_model_len
    if cfg.backend == "openai":
        return None
    from transformers import AutoConfig

    from gold_pipeline.models.loading import PKG_PREFIX, packaged_model_dir

    path = str(packaged_model_dir(cfg.teacher)) if cfg.teacher.startswith(PKG_PREFIX) else cfg.teacher
    config = AutoConfig.from_pretrained(path, revision=None if cfg.teacher.startswith(PKG_PREFIX)
                                        else cfg.teacher_revision)
    config = getattr(config, "text_config", config)
    return getattr(config, "max_position_embeddings", None)


def make_backend(cfg: TeacherCacheConfig, tokenizer, device: str, model=None):
    stop = teacher_stop_ids(tokenizer)
    if cfg.backend == "hf":
        from gold_pipeline.models.loading import load_model
        from gold_pipeline.teacher_cache.hf import HFBackend

        model = model if model is not None else load_model(cfg.teacher, revision=cfg.teacher_revision,
                                                           dtype=cfg.dtype)
        return HFBackend(model, top_k=cfg.top_k, stop_ids=stop, pad_id=pad_token_id(tokenizer),
                         temperature=cfg.temperature, top_p=cfg.top_p, sampling_top_k=cfg.sampling_top_k,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         max_context=cfg.max_context, device=device)
    if cfg.backend == "vllm":
        from gold_pipeline.teacher_cache.vllm import VLLMBackend

        return VLLMBackend.from_config(cfg, stop_ids=stop)
    from gold_pipeline.teacher_cache.openai import OpenAIBackend

    return OpenAIBackend.from_config(cfg, tokenizer=tokenizer, stop_ids=stop)


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def resolve_rank(cfg: TeacherCacheConfig) -> tuple[int, int]:
    """(rank, world_size) from the config, else from a launcher's env (accelerate launch / torchrun)."""
    if cfg.world_size is not None:
        return int(cfg.rank), int(cfg.world_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world


def run_identity(cfg: TeacherCacheConfig, fingerprints: dict) -> dict:
    """What determines the rows: everything except how the run is executed."""
    config = cfg.to_dict()
    for key in ("out", "resume", "overwrite", "progress", "num_workers", "rank", "world_size", "executor",
                "ray_address", "concurrency", "request_timeout_s", "max_retries", "extra", "api_key_env"):
        config.pop(key, None)
    return {"kind": "teacher", "config": config, "fingerprints": fingerprints}


def fingerprints_for(cfg: TeacherCacheConfig, tokenizer) -> dict:
    from gold_pipeline.data.sources import dataset_fingerprint

    revision = None if cfg.teacher_tokenizer else cfg.teacher_revision
    return {
        "dataset": dataset_fingerprint(cfg.dataset, split=cfg.split),
        "teacher_model": {"name": cfg.teacher, "revision": cfg.teacher_revision, "backend": cfg.backend},
        "teacher_tokenizer": tokenizer_record(cfg.teacher_tokenizer or cfg.teacher, revision,
                                              TokenizerSide.of(tokenizer), cfg.chat_template),
    }


def _device_for(cfg: TeacherCacheConfig, rank: int) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        return f"cuda:{local % torch.cuda.device_count()}"
    return "cpu"


def _barrier() -> None:
    """Synchronize launcher ranks (accelerate launch / torchrun set WORLD_SIZE, RANK, MASTER_ADDR)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _wait_for(predicate, what: str, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise StageTimeoutError(f"Timed out after {timeout_s:.0f} s waiting for {what}; check that process, then "
                                    f"rerun with --resume.")
        time.sleep(1.0)


def run_teacher_cache(cfg: TeacherCacheConfig, *, model=None) -> dict:
    """Run the whole command; returns a summary dict (stats, throughput, output path).

    model: an already loaded teacher (hf backend; tests and benches pass a tiny model here).
    """
    rank, world = resolve_rank(cfg)
    local_workers = cfg.num_workers if world == 1 else 1
    tokenizer = load_teacher_tokenizer(cfg)
    fingerprints = fingerprints_for(cfg, tokenizer)
    if rank == 0:
        prepare_output_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        check_run_identity(cfg.out, run_identity(cfg, fingerprints), resume=cfg.resume)
    if world > 1 and cfg.world_size is None:
        _barrier()   # launcher ranks start only after rank 0 prepared (and on --resume cleaned) the folder
    elif rank != 0:
        _wait_for(lambda: (cfg.out / "_gold" / "run.json").exists(), f"rank 0 to prepare {cfg.out}")
    writer = ShardWriter(cfg.out, kind="teacher")
    done_before = {record["index"] for record in writer.records()}
    started = time.perf_counter()
    if cfg.executor == "ray":
        from gold_pipeline.teacher_cache.ray_executor import run_shards_on_ray

        if model is not None:
            raise GoldInputError("run_teacher_cache(model=...) uses a model of this process, but --executor ray "
                                 "loads the teacher by name (--teacher) in each Ray actor: drop one of the two.")

        plan_invalid, num_shards = _plan_counts(cfg, tokenizer)
        run_shards_on_ray(cfg, [s for s in range(num_shards) if not writer.is_done(s)])
        backend_seconds = None
    elif local_workers > 1:
        context = multiprocessing.get_context("spawn")
        processes = []
        for worker in range(local_workers):
            worker_cfg = dataclasses.replace(cfg, num_workers=1, rank=worker, world_size=local_workers,
                                             resume=True, overwrite=False)
            process = context.Process(target=_worker_main, args=(worker_cfg,), name=f"teacher-cache-{worker}")
            process.start()
            processes.append(process)
        for process in processes:
            process.join()
        failed = [p.name for p in processes if p.exitcode != 0]
        if failed:
            raise WorkerFailedError(f"Teacher-cache workers {failed} failed (see their errors above); fix the cause "
                                    f"and rerun with --resume to finish the remaining shards.")
        plan_invalid, num_shards = _plan_counts(cfg, tokenizer)
        backend_seconds = None
    else:
        summary = _work(cfg, tokenizer, rank if world > 1 else 0, world, model=model)
        plan_invalid, num_shards = summary["invalid"], summary["num_shards"]
        backend_seconds = summary["seconds"]
    if rank != 0:
        return {"out": str(cfg.out), "rank": rank}
    _wait_for(lambda: all(writer.is_done(s) for s in range(num_shards)), "all ranks to finish their shards")
    seconds = time.perf_counter() - started
    manifest_stats = {"skipped": plan_invalid,
                      "bytes_per_teacher_token_uncompressed": bytes_per_teacher_token(cfg.top_k)}
    manifest = writer.write_manifest(config=cfg.to_dict(), fingerprints=fingerprints, stats=manifest_stats,
                                     expected_shards=num_shards)
    written = json.loads(manifest.read_text())
    stats = written["stats"]
    tokens = stats.get("teacher_tokens", 0)
    rows = stats.get("rows", 0)
    disk = sum(shard["bytes"] for shard in written["shards"])
    new_tokens = sum(shard["stats"].get("teacher_tokens", 0) for shard in written["shards"]
                     if shard["index"] not in done_before)
    return {
        "out": str(cfg.out),
        "manifest": str(manifest),
        "rows": rows,
        "teacher_tokens": tokens,
        "num_shards": num_shards,
        "stats": stats,
        "seconds": seconds,
        "new_teacher_tokens": new_tokens,
        # throughput of the backend (model already loaded / server up); wall time with --num-workers
        "new_tokens_per_s": new_tokens / (backend_seconds or seconds) if (backend_seconds or seconds) else 0.0,
        "disk_bytes_per_teacher_token": disk / tokens if tokens else None,
    }


def _plan_counts(cfg: TeacherCacheConfig, tokenizer) -> tuple[dict, int]:
    items, invalid = plan_prompts(cfg, tokenizer, context_length_for(cfg))
    return invalid, len(shard_ranges(len(items), cfg.rows_per_shard))


def _worker_main(cfg: TeacherCacheConfig) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cfg.world_size or 1)))
    tokenizer = load_teacher_tokenizer(cfg)
    _work(cfg, tokenizer, cfg.rank or 0, cfg.world_size or 1)


class _ShardProducer:
    """One worker's view of the work plan: the prompts planned once, the backend built at the first shard that needs
    it, `produce(s)` writes shard s atomically (tmp + rename, then its marker). The local ranks and the Ray actors
    of `--executor ray` both run shards through it."""

    def __init__(self, cfg: TeacherCacheConfig, tokenizer, rank: int, *, model=None):
        self.cfg, self.tokenizer, self.rank, self.model = cfg, tokenizer, rank, model
        self.items, self.invalid = plan_prompts(cfg, tokenizer, context_length_for(cfg, model))
        self.ranges = shard_ranges(len(self.items), cfg.rows_per_shard)
        self.writer = ShardWriter(cfg.out, kind="teacher")
        self.stop = set(teacher_stop_ids(tokenizer))
        self.backend = None

    def rows_of(self, s: int) -> int:
        start, stop_index = self.ranges[s]
        return (stop_index - start) * self.cfg.num_generations

    def ensure_backend(self) -> None:
        if self.backend is None:
            self.backend = make_backend(self.cfg, self.tokenizer, _device_for(self.cfg, self.rank), model=self.model)

    def produce(self, s: int) -> dict[str, int]:
        """Write shard s; returns its {"rows", "tokens"}."""
        cfg = self.cfg
        self.ensure_backend()
        start, stop_index = self.ranges[s]
        planned = build_requests(cfg, self.tokenizer, self.items[start:stop_index])
        try:
            results = self.backend.run([request for _, _, request in planned])
        except BackendUnavailable as error:
            raise BackendUnavailable(
                f"{error} Shards finished so far are kept: rerun the same command with --resume to continue "
                f"from shard {s}."
            ) from error
        kept = [(p, result) for p, result in zip(planned, results) if result is not None]
        rows = [make_row(item, g, request, result, self.tokenizer, self.stop, cfg.top_k)
                for (item, g, request), result in kept]
        stats = shard_stats(rows, [result for _, result in kept])
        if len(kept) < len(planned):   # rows the backend could not map back (counted, --skip-invalid)
            stats["skipped_unmappable"] = len(planned) - len(kept)
        self.writer.write_shard(s, rows_to_table(rows, cfg.top_k), stats=stats,
                                source_rows=(self.items[start].row_index, self.items[stop_index - 1].row_index + 1))
        time.sleep(float(os.environ.get(_SHARD_DELAY_ENV, "0") or 0))
        return {"rows": len(rows), "tokens": stats["teacher_tokens"]}


def _work(cfg: TeacherCacheConfig, tokenizer, rank: int, world: int, *, model=None) -> dict:
    """Produce this rank's unfinished shards. Returns {"invalid", "num_shards", "tokens", "rows", "seconds"}
    (seconds: time spent by the ready backend, model loading excluded)."""
    from gold_pipeline.progress import RateProgress

    producer = _ShardProducer(cfg, tokenizer, rank, model=model)
    mine = [s for s in range(len(producer.ranges)) if s % world == rank and not producer.writer.is_done(s)]
    summary = {"invalid": producer.invalid, "num_shards": len(producer.ranges), "tokens": 0, "rows": 0,
               "seconds": 0.0}
    if not mine:
        return summary
    producer.ensure_backend()  # model loading is not part of the timed work
    started = time.perf_counter()
    label = f"teacher-cache[{cfg.backend}]" + (f" rank {rank}/{world}" if world > 1 else "")
    with RateProgress(label, total=sum(producer.rows_of(s) for s in mine),
                      disable=not cfg.progress or None) as progress:
        for s in mine:
            done = producer.produce(s)
            summary["tokens"] += done["tokens"]
            summary["rows"] += done["rows"]
            progress.advance(rows=done["rows"], tokens=done["tokens"])
    summary["seconds"] = time.perf_counter() - started
    return summary


def shard_stats(rows: list[dict], results: list[TeacherResult]) -> dict:
    stats: dict[str, Any] = {
        "rows": len(rows),
        "teacher_tokens": int(sum(len(r["teacher_completion_ids"]) for r in rows)),
        "finish_reason": {},
    }
    for row in rows:
        stats["finish_reason"][row["finish_reason"]] = stats["finish_reason"].get(row["finish_reason"], 0) + 1
    for result in results:
        for key, value in result.stats.items():
            stats[key] = stats.get(key, 0) + value
    return stats
