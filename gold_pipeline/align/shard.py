"""One shard of `gold align`: rows in, one ALIGNED_SCHEMA table and its stats out.

Both sides' completions and prompts are tokenized in one batch call per side and the alignment runs over the
whole shard at once (align.batch.align_flat). Rows that fit max_length and are not from a teacher cache become
Arrow columns straight from the flat arrays; the others (over max_length, cached teacher ids) go through
align.row.align_example one by one. The stats of a shard are counted once, from its finished table
(`table_stats`), whichever way its rows were built.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gold_pipeline.align.batch import BatchAlignment, align_flat
from gold_pipeline.align.config import AlignConfig
from gold_pipeline.align.row import OverlongRow, Tokenized, align_example, global_group_ids
from gold_pipeline.data.ragged import append_tail, flatten, from_arrow, table_from_rows, take, to_arrow
from gold_pipeline.data.records import Example
from gold_pipeline.data.schemas import ALIGNED_SCHEMA, IDS
from gold_pipeline.errors import GoldInputError, InvalidRow
from gold_pipeline.text.encode import encode_completions, render_prompts_ids
from gold_pipeline.text.pair import TokenizerSide

SIDES = ("student", "teacher")


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Aligned rows (align_example's dicts, numpy list columns) -> a table with exactly ALIGNED_SCHEMA."""
    return table_from_rows(rows, ALIGNED_SCHEMA)


def _nest(counts: Counter) -> dict[str, Any]:
    """{("a", "b"): n} -> {"a": {"b": n}} with the shard-stat keys always present."""
    stats: dict[str, Any] = {"source_rows": 0, "rows": 0, "groups": 0, "completion_bytes": 0, "truncated_rows": 0,
                             "rows_by_status": {}, "invalid": {}, "skipped": {}, "rows_with_teacher_topk": 0}
    for path, value in sorted(counts.items()):
        node = stats
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = int(value)
    return stats


def table_stats(table: pa.Table, counts: Counter | None = None) -> dict[str, Any]:
    """The stats of an aligned table (summable across shards), added to `counts` (source_rows, invalid and
    skipped rows the caller counted). Keys: rows, groups, truncated_rows, completion_bytes, rows_by_status,
    rows_with_teacher_topk, and per side prompt/completion/grouped/excluded/zero-byte tokens and multi-token
    groups."""
    counts = Counter() if counts is None else counts
    if table.num_rows:
        num_groups = table.column("num_groups").to_numpy().astype(np.int64)  # (R,)
        counts[("rows",)] += table.num_rows
        counts[("groups",)] += int(num_groups.sum())
        counts[("truncated_rows",)] += int(pc.sum(table.column("truncated").cast(pa.int64())).as_py() or 0)
        counts[("completion_bytes",)] += int(pc.sum(pc.binary_length(table.column("completion_text"))).as_py() or 0)
        for status, number in Counter(table.column("status").to_pylist()).items():
            counts[("rows_by_status", status)] += number
        counts[("rows_with_teacher_topk",)] += table.num_rows - table.column("teacher_topk_ids").null_count
        for side in SIDES:
            groups, starts = from_arrow(table.column(f"{side}_group_ids"))  # (n,), (R+1,)
            grouped = global_group_ids(groups, starts, num_groups)
            sizes = np.bincount(grouped[grouped >= 0], minlength=int(num_groups.sum()))  # (G,) tokens per group
            excluded = int(pc.sum(table.column(f"excluded_{side}_tokens")).as_py() or 0)
            completion = groups.size
            counts[(side, "prompt_tokens")] += int(pc.sum(pc.list_value_length(table.column(f"{side}_prompt_ids")))
                                                   .as_py() or 0)  # fmt: skip
            counts[(side, "completion_tokens")] += completion
            counts[(side, "grouped_tokens")] += int(sizes.sum())
            counts[(side, "multi_token_groups")] += int((sizes > 1).sum())
            counts[(side, "excluded_tokens")] += excluded
            counts[(side, "zero_byte_tokens")] += completion - int(sizes.sum()) - excluded  # end of turn, specials
    return _nest(counts)


def _encode(tokenizer: Any, texts: list[str], examples: list[Example]) -> list[list[int]]:
    """encode_completions, with an error that names the row when a completion cannot be tokenized."""
    try:
        return encode_completions(tokenizer, texts)
    except (TypeError, UnicodeError, ValueError) as error:
        for example, text in zip(examples, texts):
            try:
                encode_completions(tokenizer, [text])
            except (TypeError, UnicodeError, ValueError):
                raise GoldInputError(f"Row {example.row_index}: its completion cannot be tokenized ({error}); fix "
                                     f"or drop that row.") from error  # fmt: skip
        raise


def _ids_column(values: np.ndarray, starts: np.ndarray) -> pa.Array:
    return to_arrow(values, starts, IDS)


def _fresh_table(examples: list[Example], batch: BatchAlignment, keep: np.ndarray, prompts: dict[str, tuple],
                 ids: dict[str, np.ndarray], tails: dict[str, np.ndarray]) -> pa.Table:
    """The aligned table of the fresh rows `keep` (F',) of `batch` (none over max_length), built from the flat
    arrays. prompts: side -> (ids (P,), starts (F+1,)); ids: side -> completion ids (N,); tails: end-of-turn ids."""
    count = len(examples)
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array([example.sample_id for example in examples], type=pa.string()),
        "row_index": pa.array([example.row_index for example in examples], type=pa.int64()),
        "generation_index": pa.array([example.generation_index for example in examples], type=pa.int32()),
        "completion_text": pa.array([example.completion_text for example in examples], type=pa.string()),
        "num_groups": pa.array(batch.num_groups[keep].astype(np.int32), type=pa.int32()),
        "status": pa.array([batch.status[f] for f in keep.tolist()], type=pa.string()),
        "truncated": pa.array(np.zeros(count, dtype=bool), type=pa.bool_()),
        "finish_reason": pa.nulls(count, pa.string()),
    }
    for side in SIDES:
        starts = getattr(batch, f"{side}_starts")
        columns[f"{side}_prompt_ids"] = _ids_column(*take(*prompts[side], keep))
        completion, completion_starts = take(ids[side], starts, keep)
        groups, _ = take(getattr(batch, f"{side}_group_ids"), starts, keep)
        tail = tails[side]
        columns[f"{side}_completion_ids"] = _ids_column(*append_tail(completion, completion_starts, tail))
        columns[f"{side}_group_ids"] = _ids_column(*append_tail(groups, completion_starts, np.full(tail.size, -1)))
        columns[f"excluded_{side}_tokens"] = pa.array(getattr(batch, f"excluded_{side}_tokens")[keep].astype(np.int32),
                                                      type=pa.int32())  # fmt: skip
    for field in ALIGNED_SCHEMA:
        if field.name not in columns:  # the teacher-cache columns: null
            columns[field.name] = pa.nulls(count, field.type)
    return pa.Table.from_arrays([columns[field.name] for field in ALIGNED_SCHEMA], schema=ALIGNED_SCHEMA)


def process_shard(items: list[Example | InvalidRow], student: TokenizerSide, teacher: TokenizerSide,
                  cfg: AlignConfig, *, threads: int | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Align the rows of one shard. Returns the table and the shard's stats (summable across shards).

    items: the shard's source rows in order; InvalidRow items (already accepted by the caller under
    --skip-invalid) are counted per reason. threads: for align_flat (1 inside worker processes)."""
    counts: Counter = Counter()
    counts[("source_rows",)] += len(items)
    examples: list[Example] = []
    for item in items:
        if isinstance(item, InvalidRow):
            counts[("invalid", item.reason)] += 1
        else:
            examples.append(item)
    if not examples:
        return rows_to_table([]), table_stats(rows_to_table([]), counts)
    texts = [example.completion_text for example in examples]
    student_ids = _encode(student.tokenizer, texts, examples)
    student_prompts = render_prompts_ids(student.tokenizer, [e.prompt_messages for e in examples])
    fresh = [k for k, example in enumerate(examples) if "teacher_completion_ids" not in example.extra]
    fresh_examples = [examples[k] for k in fresh]
    teacher_ids = _encode(teacher.tokenizer, [texts[k] for k in fresh], fresh_examples)
    teacher_prompts = render_prompts_ids(teacher.tokenizer, [e.prompt_messages for e in fresh_examples])

    batch = None
    fits = np.zeros(len(fresh), dtype=bool)  # (F,) fresh rows within max_length on both sides
    if fresh:
        prompts = {"student": flatten([student_prompts[k] for k in fresh], np.int32),  # (P,), (F+1,)
                   "teacher": flatten(teacher_prompts, np.int32)}
        s_ids, s_starts = flatten([student_ids[k] for k in fresh], np.int32)  # (N,), (F+1,)
        t_ids, t_starts = flatten(teacher_ids, np.int32)
        batch = align_flat(s_ids, s_starts, t_ids, t_starts, student.table, teacher.table,
                           [texts[k] for k in fresh], threads=threads)  # fmt: skip
        fits[:] = True
        if cfg.max_length is not None:
            s_total = np.diff(prompts["student"][1]) + np.diff(s_starts) + student.eot_ids.size  # (F,)
            t_total = np.diff(prompts["teacher"][1]) + np.diff(t_starts) + teacher.eot_ids.size
            fits = (s_total <= cfg.max_length) & (t_total <= cfg.max_length)

    # rows one by one: over max_length, or cached teacher ids
    in_batch = dict(zip(fresh, range(len(fresh))))
    alignments = batch.rows() if batch is not None and not fits.all() else None
    slow_rows, slow_positions = [], []
    for k, example in enumerate(examples):
        f = in_batch.get(k)
        if f is not None and fits[f]:
            continue
        given = (Tokenized(student_prompts[k], student_ids[k]),
                 None if f is None else Tokenized(teacher_prompts[f], teacher_ids[f]))
        try:
            row = align_example(example, student, teacher, cfg.max_length, overlong=cfg.overlong, tokenized=given,
                                alignment=None if f is None else alignments[f])  # fmt: skip
        except OverlongRow:
            counts[("skipped", "too_long")] += 1
            continue
        slow_rows.append(row)
        slow_positions.append(k)

    tables, positions = [], []
    if fits.any():
        keep = np.flatnonzero(fits)  # (F',) into fresh
        tables.append(_fresh_table([fresh_examples[f] for f in keep.tolist()], batch, keep, prompts,
                                   {"student": s_ids, "teacher": t_ids},
                                   {"student": student.eot_ids, "teacher": teacher.eot_ids}))  # fmt: skip
        positions.append(np.asarray(fresh, dtype=np.int64)[keep])
    if slow_rows:
        tables.append(rows_to_table(slow_rows))
        positions.append(np.asarray(slow_positions, dtype=np.int64))
    if not tables:
        table = rows_to_table([])
    elif len(tables) == 1:
        table = tables[0]
    else:  # both kinds in one shard: back to source order
        table = pa.concat_tables(tables).take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))
        table = table.combine_chunks()
    return table, table_stats(table, counts)
