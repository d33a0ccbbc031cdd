"""Rows in, validated `Example`s out: local jsonl/json/parquet files, anything `datasets.load_dataset` reads
(hub ids, data folders, --split), and the output folder of `gold teacher-cache`.

Row formats (checked per row; an invalid row is an error naming its index and field, or with
`skip_invalid` a counted skip):
  {"messages": [{"role", "content"}, ...]}        last message = assistant completion, everything before = prompt
  {"prompt": str | messages, "completion": str | [one assistant message]}
  a plain prompt string becomes one user message.
Prompt-only datasets (teacher-cache input) use `require_completion=False`: a row whose messages end with a user
turn is all prompt.

Everything streams: jsonl/parquet are read line by line / batch by batch and hub datasets with
`streaming=True`, so a huge dataset is never materialized.
"""

from __future__ import annotations

import glob as _glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gold_pipeline.shards import (
    MANIFEST_NAME,
    GoldInputError,
    file_sha256,
    fingerprint_path,
    iter_shard_batches,
    read_manifest,
    sample_id,
    verify_shards,
)


@dataclass
class Example:
    """One prompt + completion. extra: teacher-cache columns (numpy arrays) when read from a teacher cache."""

    sample_id: str
    prompt_messages: list[dict[str, str]]
    completion_text: str | None
    row_index: int  # 0-based position in the source stream (rows [k*S, (k+1)*S) form shard k)
    generation_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InvalidRow:
    """A row that failed validation (yielded in place of an Example by `iter_parsed`)."""

    row_index: int
    reason: str  # a key of INVALID_REASONS
    field: str
    message: str


class InvalidRowError(GoldInputError):
    def __init__(self, invalid: InvalidRow):
        super().__init__(invalid.message)
        self.invalid = invalid


SKIP_HINT = "Or pass --skip-invalid to skip such rows (they are counted per reason in the manifest)."

# reason -> (what is wrong, how to fix it)
INVALID_REASONS: dict[str, tuple[str, str]] = {
    "invalid_json": ("is not valid JSON", "Fix the line so that it holds one JSON object."),
    "not_an_object": ("is not a JSON object", "Each row must be an object with `messages` or `prompt`/`completion`."),
    "no_messages": (
        "is missing",
        "Give each row `messages` (a list of {role, content}) or `prompt` and `completion`.",
    ),
    "messages_not_a_list": ("is not a list", "`messages` must be a list of {\"role\": ..., \"content\": ...} objects."),
    "message_not_an_object": ("is not an object", "Each message must be {\"role\": str, \"content\": str}."),
    "bad_role": ("is missing or not a non-empty string", "Give each message a role such as \"user\" or \"assistant\"."),
    "non_string_content": (
        "is not a string",
        "Message content must be a plain string (flatten content parts to text).",
    ),
    "empty_messages": ("is an empty list", "Give at least a user message and the assistant completion."),
    "no_assistant_turn": (
        "has no assistant turn",
        "End `messages` with the assistant message that is the completion.",
    ),
    "messages_after_assistant": (
        "does not end with an assistant turn",
        "The completion is the final assistant message: drop the messages after it or end with the answer.",
    ),
    "empty_prompt": ("is empty", "Give at least one message (e.g. the user's question) before the completion."),
    "empty_completion": ("is an empty string", "Give a non-empty completion text."),
    "wrong_type": ("has the wrong type", "`prompt` is a string or a list of messages; `completion` a string or a "
                                          "list holding one assistant message."),
    "no_completion": ("is missing", "Give each row a `completion` (or `messages` ending with an assistant turn)."),
    "completion_not_one_assistant_turn": (
        "is not exactly one assistant message",
        "A conversational `completion` must be [{\"role\": \"assistant\", \"content\": ...}].",
    ),
}


def _invalid(row_index: int, location: str, field_name: str, reason: str, detail: str = "") -> InvalidRow:
    problem, fix = INVALID_REASONS[reason]
    where = f"Row {row_index}" + (f" ({location})" if location else "")
    detail = f" ({detail})" if detail else ""
    message = f"{where}: field `{field_name}` {problem}{detail}. {fix} {SKIP_HINT}"
    return InvalidRow(row_index=row_index, reason=reason, field=field_name, message=message)


class _RowError(Exception):
    def __init__(self, field_name: str, reason: str, detail: str = ""):
        self.field_name, self.reason, self.detail = field_name, reason, detail


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _RowError(field_name, "messages_not_a_list", f"got {_type_name(value)}")
    messages = []
    for position, message in enumerate(value):
        where = f"{field_name}[{position}]"
        if not isinstance(message, dict):
            raise _RowError(where, "message_not_an_object", f"got {_type_name(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _RowError(f"{where}.role", "bad_role", f"got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise _RowError(f"{where}.content", "non_string_content", f"got {_type_name(content)}")
        messages.append({"role": role, "content": content})
    return messages


def split_record(record: Any, *, require_completion: bool = True) -> tuple[list[dict[str, str]], str | None]:
    """(prompt messages, completion text or None) of one raw row; raises _RowError when invalid."""
    if not isinstance(record, dict):
        raise _RowError("<row>", "not_an_object", f"got {_type_name(record)}")
    if record.get("messages") is not None:
        messages = _parse_messages(record["messages"], "messages")
        if not messages:
            raise _RowError("messages", "empty_messages")
        if messages[-1]["role"] == "assistant":
            prompt, completion = messages[:-1], messages[-1]["content"]
            if not prompt:
                raise _RowError("messages", "empty_prompt", "only an assistant message")
            if completion == "":
                raise _RowError(f"messages[{len(messages) - 1}].content", "empty_completion")
            return prompt, completion
        if require_completion:
            has_assistant = any(m["role"] == "assistant" for m in messages)
            reason = "messages_after_assistant" if has_assistant else "no_assistant_turn"
            raise _RowError("messages", reason, f"last role is {messages[-1]['role']!r}")
        return messages, None
    if "prompt" not in record or record["prompt"] is None:
        raise _RowError("messages", "no_messages", f"row keys: {sorted(record)[:8]}")
    prompt_value = record["prompt"]
    if isinstance(prompt_value, str):
        if prompt_value == "":
            raise _RowError("prompt", "empty_prompt")
        prompt = [{"role": "user", "content": prompt_value}]
    elif isinstance(prompt_value, list):
        prompt = _parse_messages(prompt_value, "prompt")
        if not prompt:
            raise _RowError("prompt", "empty_prompt")
    else:
        raise _RowError("prompt", "wrong_type", f"got {_type_name(prompt_value)}")
    completion_value = record.get("completion")
    if completion_value is None:
        if require_completion:
            raise _RowError("completion", "no_completion")
        return prompt, None
    if isinstance(completion_value, str):
        completion = completion_value
    elif isinstance(completion_value, list):
        turns = _parse_messages(completion_value, "completion")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise _RowError("completion", "completion_not_one_assistant_turn", f"{len(turns)} message(s)")
        completion = turns[0]["content"]
    else:
        raise _RowError("completion", "wrong_type", f"got {_type_name(completion_value)}")
    if completion == "":
        raise _RowError("completion", "empty_completion")
    return prompt, completion


# --------------------------------------------------------------------------------------------------------------
# Raw records
# --------------------------------------------------------------------------------------------------------------

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def is_teacher_cache(path: str | os.PathLike) -> bool:
    """True when `path` is a folder with a manifest.json of kind "teacher"."""
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("kind") == "teacher"
    except (OSError, json.JSONDecodeError):
        return False


def _local_files(dataset: str) -> list[Path] | None:
    """The local files `dataset` names (a file or a glob), or None when it is not local."""
    if any(char in dataset for char in "*?["):
        files = sorted(Path(p) for p in _glob.glob(dataset))
        if not files:
            raise GoldInputError(f"No file matches --dataset {dataset!r}: check the pattern.")
        return files
    path = Path(dataset)
    if path.is_file():
        return [path]
    return None


def _iter_json_file(path: Path, start_index: int) -> Iterator[tuple[int, Any, str]]:
    """(row_index, record or InvalidRow, location) of a JSON-lines file or a JSON array file."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise GoldInputError(f"{path} is not valid JSON ({error}): fix the file.") from None
            for offset, record in enumerate(records):
                yield start_index + offset, record, f"{path.name} item {offset}"
            return
        if path.suffix == ".json" and head.startswith("{") and "\n" in head:
            first_line = head.split("\n", 1)[0]
            try:
                json.loads(first_line)
            except json.JSONDecodeError:  # not JSON lines: maybe one pretty-printed object
                try:
                    whole = json.load(handle)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    raise GoldInputError(
                        f"{path} holds one JSON object (keys {sorted(whole)[:5]}), not rows: write a JSON array of "
                        f"rows or JSON lines (one row object per line)."
                    ) from None
                handle.seek(0)
        index = start_index
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{path.name} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record = _invalid(index, location, "<line>", "invalid_json", str(error))
            yield index, record, location
            index += 1


def _iter_parquet_file(path: Path, start_index: int) -> Iterator[tuple[int, Any, str]]:
    index = start_index
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield index, record, f"{path.name} row {index - start_index}"
            index += 1


def iter_records(
    dataset: str, *, split: str = "train", config_name: str | None = None
) -> Iterator[tuple[int, Any, str]]:
    """(row_index, raw record, location) for every row; a record may already be an InvalidRow (bad JSON).

    Local .jsonl/.json/.parquet files (or a glob of them) are read directly (exact errors, no type coercion);
    everything else (hub ids, data folders, .csv/.arrow) goes through `datasets.load_dataset(streaming=True)`.
    """
    files = _local_files(dataset)
    if files is not None:
        suffixes = {file.suffix for file in files}
        if len(suffixes) > 1 or not suffixes <= set(LOCAL_EXTENSIONS):
            raise GoldInputError(
                f"--dataset {dataset!r} names files with extensions {sorted(suffixes)}: use .jsonl, .json, "
                f".parquet, .csv or .arrow files, all of one kind."
            )
        suffix = suffixes.pop()
        if suffix in (".jsonl", ".json", ".parquet"):
            if split != "train":
                raise GoldInputError(
                    f"Local file dataset {dataset!r} has only the 'train' split, not {split!r}: drop --split or "
                    f"point --dataset at the file of that split."
                )
            index = 0
            for file in files:
                reader = _iter_parquet_file if suffix == ".parquet" else _iter_json_file
                for index_, record, location in reader(file, index):
                    yield index_, record, location
                    index = index_ + 1
            return
        yield from _iter_datasets(LOCAL_EXTENSIONS[suffix], split, data_files=[str(f) for f in files])
        return
    yield from _iter_datasets(dataset, split, name=config_name)


def _iter_datasets(path: str, split: str, **kwargs: Any) -> Iterator[tuple[int, Any, str]]:
    import datasets

    try:
        stream = datasets.load_dataset(path, split=split, streaming=True, **kwargs)
    except Exception as error:  # datasets raises many types; the message is what matters
        local = Path(path).exists()
        hint = "check the folder's data files" if local else (
            "it is not a local file, so it was looked up as a hub dataset id; check the path, or the hub "
            "connection (HF_DATASETS_OFFLINE)"
        )
        raise GoldInputError(f"Could not load dataset {path!r} split {split!r}: {error}. ({hint})") from error
    for index, record in enumerate(stream):
        yield index, record, ""


# --------------------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------------------


class _GenerationCounter:
    """generation_index = how many earlier valid rows had the same prompt, so sample ids stay unique.

    Keeps one 64-bit key per distinct prompt (~100 bytes each). A key collision (p ~ n^2 / 2^65) would only
    give a row generation_index 1 instead of 0; its sample_id stays unique because it hashes the prompt."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def next(self, prompt: list[dict[str, str]]) -> tuple[str, int]:
        first = sample_id(prompt, 0)
        key = int(first[:16], 16)
        generation_index = self.seen.get(key, 0)
        self.seen[key] = generation_index + 1
        return (first if generation_index == 0 else sample_id(prompt, generation_index)), generation_index


def iter_parsed(
    dataset: str, *, split: str = "train", config_name: str | None = None, require_completion: bool = True
) -> Iterator[Example | InvalidRow]:
    """Every row of `dataset` in order, as an Example or an InvalidRow. A teacher-cache folder is accepted."""
    if is_teacher_cache(dataset):
        yield from iter_teacher_cache(dataset)
        return
    counter = _GenerationCounter()
    for row_index, record, location in iter_records(dataset, split=split, config_name=config_name):
        if isinstance(record, InvalidRow):
            yield record
            continue
        try:
            prompt, completion = split_record(record, require_completion=require_completion)
        except _RowError as error:
            yield _invalid(row_index, location, error.field_name, error.reason, error.detail)
            continue
        identifier, generation_index = counter.next(prompt)
        yield Example(identifier, prompt, completion, row_index, generation_index)


def iter_examples(
    dataset: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    skip_invalid: bool = False,
    require_completion: bool = True,
    invalid_counts: dict[str, int] | None = None,
) -> Iterator[Example]:
    """Valid Examples of `dataset`. An invalid row raises InvalidRowError (naming row and field) unless
    `skip_invalid`, in which case it is counted per reason into `invalid_counts`."""
    for item in iter_parsed(dataset, split=split, config_name=config_name, require_completion=require_completion):
        if isinstance(item, InvalidRow):
            if not skip_invalid:
                raise InvalidRowError(item)
            if invalid_counts is not None:
                invalid_counts[item.reason] = invalid_counts.get(item.reason, 0) + 1
            continue
        yield item


# --------------------------------------------------------------------------------------------------------------
# Teacher cache as a source
# --------------------------------------------------------------------------------------------------------------

TEACHER_ARRAY_COLUMNS = ("teacher_prompt_ids", "teacher_completion_ids", "teacher_token_logprobs")
TEACHER_TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")


def _list_rows(column: pa.Array) -> list[np.ndarray | None]:
    """list<T> column -> one numpy array per row (None for null rows). Zero-copy slices of the values."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(column))]


def _nested_rows(column: pa.Array, name: str, first_row: int) -> list[np.ndarray | None]:
    """list<list<T>> column -> one (m, K) array per row (None for null rows); K must be the same per row."""
    outer = column.offsets.to_numpy()
    inner_column = column.values
    inner = inner_column.offsets.to_numpy()
    values = inner_column.values.to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    rows: list[np.ndarray | None] = []
    for i in range(len(column)):
        if not valid[i]:
            rows.append(None)
            continue
        start, stop = outer[i], outer[i + 1]
        lengths = np.diff(inner[start:stop + 1])
        k = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and not np.all(lengths == k):
            raise GoldInputError(
                f"Teacher cache row {first_row + i}: `{name}` has top-k lists of different lengths "
                f"({sorted(set(lengths.tolist()))[:5]}); every token needs the same K. Regenerate the cache."
            )
        rows.append(values[inner[start]:inner[stop]].reshape(len(lengths), k))
    return rows


def iter_teacher_cache(cache_dir: str | os.PathLike, *, batch_size: int = 256) -> Iterator[Example | InvalidRow]:
    """Rows of a `gold teacher-cache` output as Examples; extra holds the teacher's ids and top-k as numpy:
    teacher_prompt_ids (P,), teacher_completion_ids (m,), teacher_token_logprobs (m,) | None,
    teacher_topk_ids (m, K) | None, teacher_topk_logprobs (m, K) | None, finish_reason."""
    manifest = read_manifest(cache_dir, kind="teacher")
    verify_shards(cache_dir, manifest)
    row_index = 0
    for batch in iter_shard_batches(cache_dir, manifest, batch_size=batch_size):
        scalars = batch.select(["sample_id", "generation_index", "messages", "completion_text", "finish_reason"])
        scalars = scalars.to_pydict()
        arrays = {name: _list_rows(batch.column(name)) for name in TEACHER_ARRAY_COLUMNS}
        nested = {name: _nested_rows(batch.column(name), name, row_index) for name in TEACHER_TOPK_COLUMNS}
        for i in range(batch.num_rows):
            location = f"teacher cache row {row_index}"
            completion = scalars["completion_text"][i]
            if not completion:
                yield _invalid(row_index, location, "completion_text", "empty_completion")
                row_index += 1
                continue
            extra = {name: arrays[name][i] for name in TEACHER_ARRAY_COLUMNS}
            extra.update({name: nested[name][i] for name in TEACHER_TOPK_COLUMNS})
            extra["finish_reason"] = scalars["finish_reason"][i]
            m = len(extra["teacher_completion_ids"])
            for name in ("teacher_token_logprobs", *TEACHER_TOPK_COLUMNS):
                if extra[name] is not None and len(extra[name]) != m:
                    raise GoldInputError(
                        f"Teacher cache {cache_dir} row {row_index}: `{name}` has {len(extra[name])} entries for "
                        f"{m} completion ids. The cache is inconsistent: regenerate it."
                    )
            yield Example(
                sample_id=scalars["sample_id"][i],
                prompt_messages=[dict(m_) for m_ in scalars["messages"][i]],
                completion_text=completion,
                row_index=row_index,
                generation_index=scalars["generation_index"][i],
                extra=extra,
            )
            row_index += 1


# --------------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset: str, *, split: str = "train", config_name: str | None = None) -> dict[str, Any]:
    """What identifies the input rows: local files (path, size, mtime, sha256), a teacher cache (its manifest's
    sha256 + its own inputs), or a hub id + split."""
    if is_teacher_cache(dataset):
        manifest = read_manifest(dataset, kind="teacher")
        return {
            "kind": "teacher_cache",
            "path": str(Path(dataset).resolve()),
            "manifest_sha256": file_sha256(Path(dataset) / MANIFEST_NAME),
            "num_rows": manifest["num_rows"],
            "inputs": manifest.get("fingerprints", {}),
        }
    files = _local_files(dataset)
    if files is not None:
        return {"kind": "files", "split": split, "files": [fingerprint_path(f)["files"][0] for f in files]}
    if Path(dataset).is_dir():
        return {"kind": "folder", "split": split, **fingerprint_path(dataset)}
    return {"kind": "hub", "id": dataset, "split": split, "config": config_name}
