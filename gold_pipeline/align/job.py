"""`gold align`: dataset (or teacher cache) -> aligned Parquet shards + vocab map + manifest (DESIGN.md §2, §5).

Per row:
  student_prompt_ids  = render_prompt_ids(student, prompt)        each side renders its OWN chat template
  teacher_prompt_ids  = render_prompt_ids(teacher, prompt)        (teacher cache: the cached ids, untouched)
  *_completion_ids    = encode_completion(side, completion_text)  each side tokenizes the completion on its own
                        + end_of_turn_ids(side)                   group id -1 (teaches the student to stop)
  groups              = align.groups.align_completion(...)        byte-exact groups, -1 = excluded tail
A shard does this for all its rows at once (align.shard.process_shard); align.row.align_example is the one-row
form (rows cut to max_length, rows from a teacher cache, and the reference in the tests).
With a teacher cache as the source, the teacher's completion ids are the cached generated ids (their trailing
end-of-turn/EOS included), the top-k columns are carried over, and the student gets its end-of-turn ids only
when the teacher stopped (finish_reason != "length").

Overlong rows (`max_length` = prompt + completion tokens, checked on each side):
  "truncate" (default): cut the completion at the last common group boundary (that is also a UTF-8 character
             boundary) where both sides fit; no end-of-turn ids are appended to a cut completion; the row's
             `truncated` is true and completion_text is the kept text. A prompt that alone does not fit, or a
             cut that keeps no group, skips the row (counted as `skipped.too_long`).
  "skip":    skip the row and count it (`skipped.too_long`).

Row k of the source (0-based) goes to shard k // shard_size, so `--resume` redoes exactly the unfinished shards
and the output equals that of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from gold_pipeline.align.config import PROJECTION_FILE, VOCAB_MAP_FILE, AlignConfig
from gold_pipeline.align.shard import process_shard
from gold_pipeline.data.records import Example
from gold_pipeline.data.schemas import VOCAB_MAP_SCHEMA
from gold_pipeline.data.shards import (
    ShardWriter,
    check_fingerprint,
    check_run_identity,
    merge_stats,
    prepare_output_dir,
    read_manifest,
    write_table_atomic,
)
from gold_pipeline.data.sources import dataset_fingerprint, iter_parsed
from gold_pipeline.errors import GoldError, GoldInputError, InvalidRow, InvalidRowError, WorkerFailedError
from gold_pipeline.progress import RateProgress
from gold_pipeline.text.pair import TokenizerSide, TokenizerSpec, load_side, tokenizer_record
from gold_pipeline.text.projection import cached_projection, projection_arrow
from gold_pipeline.text.vocab_map import cached_vocab_map

# Test hook: seconds to sleep after each finished shard, so a test can kill a run between shards.
_SHARD_DELAY_ENV = "GOLD_ALIGN_TEST_SHARD_DELAY"



# --------------------------------------------------------------------------------------------------------------
# Shards: one loop, run in this process or on a pool of worker processes
# --------------------------------------------------------------------------------------------------------------


def _checked(items: Iterable[Example | InvalidRow], skip_invalid: bool) -> Iterator[Example | InvalidRow]:
    """The rows, stopping at the first invalid one unless --skip-invalid (the one place invalid rows are
    refused, so the serial and the parallel run fail on the same row with the same message)."""
    for item in items:
        if isinstance(item, InvalidRow) and not skip_invalid:
            raise InvalidRowError(item)
        yield item


def _test_delay() -> None:
    delay = float(os.environ.get(_SHARD_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _completion_tokens(record: dict[str, Any]) -> int:
    stats = record["stats"]
    return sum(stats.get(side, {}).get("completion_tokens", 0) for side in ("student", "teacher"))


class _Executor:
    """Runs shards; `submit` may return before the shard is written, `drain` waits for all of them. Both return
    the (rows, record) of every shard that finished meanwhile."""

    def __enter__(self) -> _Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def submit(self, index: int, span: tuple[int, int], chunk: list) -> list[tuple[int, dict]]:
        raise NotImplementedError

    def drain(self) -> list[tuple[int, dict]]:
        return []


class _InProcess(_Executor):
    def __init__(self, student: TokenizerSide, teacher: TokenizerSide, cfg: AlignConfig, writer: ShardWriter):
        self.student, self.teacher, self.cfg, self.writer = student, teacher, cfg, writer

    def submit(self, index: int, span: tuple[int, int], chunk: list) -> list[tuple[int, dict]]:
        table, stats = process_shard(chunk, self.student, self.teacher, self.cfg)
        record = self.writer.write_shard(index, table, stats=stats, source_rows=span)
        _test_delay()
        return [(len(chunk), record)]


_WORKER: dict[str, Any] = {}


def _init_worker(student_spec: TokenizerSpec, teacher_spec: TokenizerSpec, cfg: AlignConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(student=load_side(student_spec), teacher=load_side(teacher_spec), cfg=cfg,
                   writer=ShardWriter(cfg.out, kind="aligned"))


def _worker_shard(index: int, span: tuple[int, int], items: list[Example | InvalidRow]) -> dict[str, Any]:
    table, stats = process_shard(items, _WORKER["student"], _WORKER["teacher"], _WORKER["cfg"], threads=1)
    record = _WORKER["writer"].write_shard(index, table, stats=stats, source_rows=span)
    _test_delay()
    return record


class _WorkerPool(_Executor):
    """Shards on a process pool (each worker has the tokenizers loaded once); at most 2 shards queued per worker
    so a huge streaming dataset is never held in memory."""

    def __init__(self, student_spec: TokenizerSpec, teacher_spec: TokenizerSpec, cfg: AlignConfig):
        # fork (Linux): workers inherit the tokenizers this process already loaded (load_side is cached), so
        # they start in milliseconds; elsewhere spawn, and each worker loads them once in its initializer.
        method = "fork" if sys.platform == "linux" else "spawn"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust thread pool must not be live across a fork
        self.limit = 2 * cfg.num_workers
        self.pending: dict[Future, int] = {}
        self.pool = ProcessPoolExecutor(max_workers=cfg.num_workers, mp_context=get_context(method),
                                        initializer=_init_worker, initargs=(student_spec, teacher_spec, cfg))

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, done) -> list[tuple[int, dict]]:
        out = []
        for future in done:
            size = self.pending.pop(future)
            try:
                out.append((size, future.result()))
            except GoldError:
                raise
            except BrokenProcessPool as error:
                raise WorkerFailedError(f"An align worker process died ({error}); the finished shards are kept: "
                                        f"rerun with --resume (or --num-workers 1 to see the cause).") from error
            except Exception as error:
                raise WorkerFailedError(f"An align worker failed: {type(error).__name__}: {error}. The finished "
                                        f"shards are kept: fix the cause and rerun with --resume.") from error
        return out

    def submit(self, index: int, span: tuple[int, int], chunk: list) -> list[tuple[int, dict]]:
        self.pending[self.pool.submit(_worker_shard, index, span, chunk)] = len(chunk)
        if len(self.pending) < self.limit:
            return []
        done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
        return self._collect(done)

    def drain(self) -> list[tuple[int, dict]]:
        done, _ = wait(list(self.pending))
        return self._collect(done)


def _run_shards(items: Iterable[Example | InvalidRow], cfg: AlignConfig, writer: ShardWriter, executor: _Executor,
                bar: RateProgress) -> int:
    """Every shard not yet written goes to `executor`; returns the number of shards of the source."""
    num_shards = 0

    def advance(finished: list[tuple[int, dict]]) -> None:
        for size, record in finished:
            bar.advance(rows=size, tokens=_completion_tokens(record))

    for index, chunk in _chunks(_checked(items, cfg.skip_invalid), cfg.shard_size):
        num_shards = index + 1
        if writer.is_done(index):
            bar.advance(rows=len(chunk))
            continue
        advance(executor.submit(index, (chunk[0].row_index, chunk[-1].row_index + 1), chunk))
    advance(executor.drain())
    return num_shards


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------


def _chunks(items: Iterator[Example | InvalidRow], size: int) -> Iterator[tuple[int, list[Example | InvalidRow]]]:
    """(shard index, items) with shard k = source rows [k*size, (k+1)*size)."""
    chunk: list[Example | InvalidRow] = []
    index = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield index, chunk
            chunk, index = [], index + 1
    if chunk:
        yield index, chunk


def _estimate_rows(cfg: AlignConfig) -> int | None:
    """Row count for the progress bar when it is cheap to know (teacher cache, parquet, small jsonl)."""
    source = Path(cfg.source)
    try:
        if cfg.teacher_cache is not None:
            return int(read_manifest(cfg.teacher_cache, kind="teacher")["num_rows"])
        if source.suffix == ".parquet" and source.is_file():
            import pyarrow.parquet as pq

            return pq.ParquetFile(source).metadata.num_rows
        if source.suffix == ".jsonl" and source.is_file() and source.stat().st_size < (256 << 20):
            with open(source, "rb") as handle:
                return sum(1 for line in handle if line.strip())
    except Exception:  # an estimate only; the reader reports real problems
        return None
    return None


def _derived_stats(stats: dict[str, Any]) -> dict[str, Any]:
    groups = max(stats.get("groups", 0), 1)
    derived = {}
    for side in ("student", "teacher"):
        part = stats.get(side, {})
        derived[f"{side}_multi_token_group_share"] = part.get("multi_token_groups", 0) / groups
        derived[f"{side}_tokens_per_group"] = part.get("grouped_tokens", 0) / groups
    derived["rows_with_mismatch"] = sum(v for k, v in stats.get("rows_by_status", {}).items() if k != "ok")
    return {"derived": derived}


def _resolve_teacher(cfg: AlignConfig) -> tuple[TokenizerSpec, dict[str, Any] | None]:
    """The teacher tokenizer to load, and the teacher cache's manifest when the rows come from one.

    With a cache, the tokenizer defaults to the one it names, loaded with the chat template file its config
    names (the fingerprint covers the template; the prompt ids themselves are taken from the cache)."""
    if cfg.teacher_cache is None:
        spec = TokenizerSpec(cfg.teacher_tokenizer, cfg.teacher_tokenizer_revision,  # type: ignore[arg-type]
                             _read_template(cfg.teacher_chat_template))
        return spec, None
    manifest = read_manifest(cfg.teacher_cache, kind="teacher")
    recorded = (manifest.get("fingerprints") or {}).get("teacher_tokenizer") or {}
    name = cfg.teacher_tokenizer or recorded.get("name")
    if not name:
        raise GoldInputError(f"The teacher cache {cfg.teacher_cache} does not name its teacher tokenizer: pass "
                             f"--teacher-tokenizer.")
    template_file = (manifest.get("config") or {}).get("chat_template")
    template = _read_template(template_file) if template_file and Path(template_file).is_file() else None
    return TokenizerSpec(name, cfg.teacher_tokenizer_revision or recorded.get("revision"), template), manifest


def _read_template(path: str | None) -> str | None:
    return Path(path).read_text(encoding="utf-8") if path is not None else None


def run_align(cfg: AlignConfig) -> dict[str, Any]:
    """Align `cfg.source` into `cfg.out` (shards, vocab_map/{vocab_map,projection}.parquet, manifest.json last).

    Returns the manifest's stats. Raises GoldInputError subclasses (with a sentence saying what to do) for bad
    input, an existing output without resume/overwrite, or a teacher cache made with another tokenizer.
    """
    started = time.perf_counter()
    teacher_spec, cache_manifest = _resolve_teacher(cfg)
    student_spec = TokenizerSpec(cfg.student_tokenizer, cfg.student_tokenizer_revision,
                                 _read_template(cfg.student_chat_template))
    student, teacher = load_side(student_spec), load_side(teacher_spec)
    fingerprints = {
        "dataset": dataset_fingerprint(cfg.source, split=cfg.split, config_name=cfg.dataset_config),
        "student_tokenizer": tokenizer_record(student_spec.name, student_spec.revision, student,
                                              cfg.student_chat_template),
        "teacher_tokenizer": tokenizer_record(teacher_spec.name, teacher_spec.revision, teacher,
                                              cfg.teacher_chat_template),
    }
    if cache_manifest is not None:
        check_fingerprint(cache_manifest, "teacher_tokenizer", fingerprints["teacher_tokenizer"]["sha256"],
                          name=teacher_spec.name)
        fingerprints["teacher_model"] = (cache_manifest.get("fingerprints") or {}).get("teacher_model")

    config = dataclasses.asdict(cfg) | {"teacher_tokenizer": teacher_spec.name,
                                        "teacher_tokenizer_revision": teacher_spec.revision}
    runtime_only = ("out", "resume", "overwrite", "num_workers", "progress", "executor", "ray_address")
    identity = {"config": {k: v for k, v in config.items() if k not in runtime_only}, "fingerprints": fingerprints}
    out = prepare_output_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    check_run_identity(out, identity, resume=cfg.resume)
    writer = ShardWriter(out, kind="aligned")

    vocab_path = out / VOCAB_MAP_FILE
    pairs = np.asarray(cached_vocab_map(student.table, teacher.table)).reshape(-1, 2).astype(np.int32)  # (M, 2)
    vocab_table = pa.Table.from_arrays([pa.array(pairs[:, 0]), pa.array(pairs[:, 1])], schema=VOCAB_MAP_SCHEMA)
    vocab_record = write_table_atomic(vocab_path, vocab_table)
    projection = cached_projection(student.table, teacher.table, teacher.tokenizer)
    projection_record = write_table_atomic(out / PROJECTION_FILE, projection_arrow(projection))

    items = iter_parsed(cfg.source, split=cfg.split, config_name=cfg.dataset_config)
    num_shards = 0
    processing_started = time.perf_counter()
    disable = None if cfg.progress is None else not cfg.progress
    with RateProgress("align", total=_estimate_rows(cfg), disable=disable) as bar:
        if cfg.executor == "ray":
            from gold_pipeline.align.ray_executor import RayShards

            executor: _Executor = RayShards(student_spec, teacher_spec, cfg)
        elif cfg.num_workers == 1:
            executor = _InProcess(student, teacher, cfg, writer)
        else:
            executor = _WorkerPool(student_spec, teacher_spec, cfg)
        with executor:
            num_shards = _run_shards(items, cfg, writer, executor, bar)
    if num_shards == 0:
        raise GoldInputError(f"Dataset {cfg.source} has no rows: nothing to align.")

    records = writer.records()
    total = merge_stats(*(record["stats"] for record in records))
    elapsed = time.perf_counter() - started
    processing = time.perf_counter() - processing_started
    extra_stats = _derived_stats(total) | {
        "vocab_map": {"pairs": vocab_record["rows"],
                      "student_share": vocab_record["rows"] / max(fingerprints["student_tokenizer"]["vocab_size"], 1),
                      "teacher_share": vocab_record["rows"] / max(fingerprints["teacher_tokenizer"]["vocab_size"], 1)},
        "projection": {"rows": projection_record["rows"], "kinds": projection.counts(),
                       "coverage": projection.coverage(student.table)},
        # this invocation only (a resumed run counts the shards it wrote): wall time incl. tokenizer loading,
        # and completion tokens (both sides) per second of the shard loop
        "last_run": {"seconds": round(elapsed, 3), "resumed": cfg.resume,
                     "completion_tokens": bar.tokens,
                     "completion_tokens_per_s": round(bar.tokens / max(processing, 1e-9), 1)},
    }
    files = {"vocab_map": VOCAB_MAP_FILE, "vocab_map_sha256": vocab_record["sha256"],
             "projection": PROJECTION_FILE, "projection_sha256": projection_record["sha256"]}
    config["overlong_policy"] = (
        "none (no max_length)" if cfg.max_length is None else
        f"{cfg.overlong}: rows over {cfg.max_length} prompt+completion tokens on either side are "
        + ("cut at the last common group boundary that fits (no end-of-turn ids)" if cfg.overlong == "truncate"
           else "skipped") + "; skips counted in stats.skipped.too_long")
    writer.write_manifest(config=config, fingerprints=fingerprints, stats=extra_stats, files=files,
                          expected_shards=num_shards)
    return read_manifest(out, kind="aligned")["stats"]
