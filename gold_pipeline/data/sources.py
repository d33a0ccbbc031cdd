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
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gold_pipeline.data.ragged import RaggedError, arrow_rows
from gold_pipeline.data.records import SKIP_HINT, Example, RowError, invalid_row, split_record
from gold_pipeline.data.shards import (
    MANIFEST_NAME,
    file_sha256,
    fingerprint_path,
    iter_shard_batches,
    read_manifest,
    sample_id,
    verify_shards,
)
from gold_pipeline.errors import GoldInputError, InvalidRow, InvalidRowError

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


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise GoldInputError(f"{path} line {line}: byte {error.start} of the file is not valid UTF-8 ({error.reason}); "
                             f"re-encode the file as UTF-8.") from None


def _iter_json_file(path: Path, start_index: int) -> Iterator[tuple[int, Any, str]]:
    """(row_index, record or InvalidRow, location) of a JSON-lines file or a JSON array file.

    Read as bytes: a line that is not valid UTF-8 becomes an InvalidRow ("invalid_utf8") naming its file and
    line, like a line that is not JSON, so --skip-invalid can skip it."""
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace").lstrip()
        handle.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            try:
                records = json.loads(_decode(handle.read(), path))
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
                    whole = json.loads(handle.read().decode("utf-8", errors="replace"))
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    raise GoldInputError(
                        f"{path} holds one JSON object (keys {sorted(whole)[:5]}), not rows: write a JSON array of "
                        f"rows or JSON lines (one row object per line)."
                    ) from None
                handle.seek(0)
        index = start_index
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            location = f"{path.name} line {line_number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                record = invalid_row(index, location, "<line>", "invalid_utf8",
                                     f"byte {error.start} of the line: {error.reason}")
            except json.JSONDecodeError as error:
                record = invalid_row(index, location, "<line>", "invalid_json", str(error))
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


def parse_records(records: Iterable[tuple[int, Any, str]], *, require_completion: bool = True,
                  hint: str = SKIP_HINT) -> Iterator[Example | InvalidRow]:
    """(row_index, raw record, location) -> an Example or an InvalidRow per row, in order: the one place every
    source's rows are validated (files, hub datasets, in-memory lists and datasets.Dataset)."""
    counter = _GenerationCounter()
    for row_index, record, location in records:
        if isinstance(record, InvalidRow):
            yield record
            continue
        try:
            prompt, completion = split_record(record, require_completion=require_completion)
        except RowError as error:
            yield invalid_row(row_index, location, error.field_name, error.reason, error.detail, hint)
            continue
        identifier, generation_index = counter.next(prompt)
        yield Example(identifier, prompt, completion, row_index, generation_index)


def iter_parsed(
    dataset: str, *, split: str = "train", config_name: str | None = None, require_completion: bool = True
) -> Iterator[Example | InvalidRow]:
    """Every row of `dataset` in order, as an Example or an InvalidRow. A teacher-cache folder is accepted."""
    if is_teacher_cache(dataset):
        yield from iter_teacher_cache(dataset)
        return
    yield from parse_records(iter_records(dataset, split=split, config_name=config_name),
                             require_completion=require_completion)


def examples_from_records(records, *, what: str = "train_dataset") -> list[Example]:
    """Validated Examples of an in-memory dataset (a list of row dicts or a datasets.Dataset), with the same
    rules as `gold align`; an invalid row raises InvalidRowError naming `what` and the row. Examples (already
    validated, e.g. by iter_examples) pass through."""
    if isinstance(records, list) and all(isinstance(record, Example) for record in records):
        return records
    rows = ((index, record, what) for index, record in enumerate(records))
    hint = "Fix or drop that row of the dataset you pass."
    return [_valid(item) for item in parse_records(rows, hint=hint)]


def _valid(item: Example | InvalidRow) -> Example:
    if isinstance(item, InvalidRow):
        raise InvalidRowError(item)
    return item


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


def _nested_rows(column: pa.Array, name: str, first_row: int, cache_dir) -> list[np.ndarray | None]:
    """list<list<T>> column -> one (m, K) array per row (None for null rows); K must be the same per row."""
    try:
        return arrow_rows(column)
    except RaggedError as exc:
        raise GoldInputError(f"Teacher cache {cache_dir} row {first_row + exc.row}: `{name}` has top-k lists of "
                             f"different lengths; every token needs the same K. Regenerate the cache.") from None


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
        arrays = {name: arrow_rows(batch.column(name)) for name in TEACHER_ARRAY_COLUMNS}
        nested = {name: _nested_rows(batch.column(name), name, row_index, cache_dir) for name in TEACHER_TOPK_COLUMNS}
        for i in range(batch.num_rows):
            location = f"teacher cache row {row_index}"
            completion = scalars["completion_text"][i]
            if not completion:
                yield invalid_row(row_index, location, "completion_text", "empty_completion")
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
