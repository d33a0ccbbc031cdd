"""Training datasets: aligned rows from shards (read lazily) or raw conversations (validated like `gold align`
and aligned on the fly), cut to the run's limits, and the seeded, resumable sampler."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gold_pipeline.align.row import align_example, cut_at_group, student_byte_lengths
from gold_pipeline.data.ragged import RaggedError, arrow_rows
from gold_pipeline.data.sources import examples_from_records
from gold_pipeline.errors import GoldInputError
from gold_pipeline.text.pair import TokenizerPair
from gold_pipeline.training.collate import TOPK_COLUMNS

logger = logging.getLogger(__name__)

ROW_COLUMNS = (
    "sample_id",
    "completion_text",
    "student_prompt_ids",
    "student_completion_ids",
    "teacher_prompt_ids",
    "teacher_completion_ids",
    "student_group_ids",
    "teacher_group_ids",
)
ROW_KEEP = frozenset(ROW_COLUMNS) | {"num_groups"}


def prompt_budget(max_length: int | None, max_completion_length: int) -> int | None:
    return None if max_length is None else max(1, max_length - max_completion_length)


def keep_end(ids: list[int], budget: int | None) -> list[int]:
    """Prompts keep their end (the generation marker) when cut to the budget."""
    return ids if budget is None or len(ids) <= budget else ids[-budget:]


def fit_row(row: dict, pair: TokenizerPair, max_completion_length: int, budget: int | None) -> dict:
    """Cut a stored row to this run's limits: the prompt keeps its end; the completion is cut by
    `align.row.cut_at_group` (a common group boundary on a UTF-8 character boundary, so both sides keep the same
    bytes and `completion_text` stays the kept text)."""
    row = dict(row)
    row["student_prompt_ids"] = keep_end(list(row["student_prompt_ids"]), budget)
    row["teacher_prompt_ids"] = keep_end(list(row["teacher_prompt_ids"]), budget)
    s_ids, t_ids = list(row["student_completion_ids"]), list(row["teacher_completion_ids"])
    s_groups, t_groups = list(row["student_group_ids"]), list(row["teacher_group_ids"])
    num_groups = max(s_groups, default=-1) + 1
    if len(s_ids) > max_completion_length or len(t_ids) > max_completion_length:
        text = row["completion_text"]
        text_bytes = text.encode("utf-8")
        cut = cut_at_group(np.asarray(s_groups), np.asarray(t_groups), num_groups,
                           student_byte_lengths(pair.student_table, s_ids, text), text_bytes,
                           max_completion_length, max_completion_length)  # fmt: skip
        s_ids, s_groups = s_ids[: cut.student_tokens], s_groups[: cut.student_tokens]
        t_ids, t_groups = t_ids[: cut.teacher_tokens], t_groups[: cut.teacher_tokens]
        row["completion_text"] = text_bytes[: cut.text_bytes].decode("utf-8")
        num_groups = cut.groups
        row["truncated"] = True
    row.update(student_completion_ids=s_ids, teacher_completion_ids=t_ids, student_group_ids=s_groups,
               teacher_group_ids=t_groups)
    for name in TOPK_COLUMNS:
        if row.get(name) is not None:
            row[name] = row[name][: len(t_ids)]
    row["num_groups"] = num_groups
    return row


class RawConversationDataset(torch.utils.data.Dataset):
    """A datasets.Dataset / list of dicts with `messages` or `prompt`/`completion`, aligned on the fly."""

    def __init__(self, records, pair: TokenizerPair, *, max_completion_length: int, max_length: int | None,
                 what: str = "train_dataset"):
        self.examples = examples_from_records(records, what=what)  # every row checked now, as `gold align` does
        self.pair = pair
        self.max_completion_length = max_completion_length
        self.prompt_budget = prompt_budget(max_length, max_completion_length)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        row = align_example(self.examples[int(index)], self.pair.student, self.pair.teacher)
        row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items() if k in ROW_KEEP}
        return fit_row(row, self.pair, self.max_completion_length, self.prompt_budget)


# ----------------------------------------------------------------------------------------------------------
# Aligned shards: a lazily read, map-style dataset (row groups cached, never the whole directory).
# ----------------------------------------------------------------------------------------------------------


class AlignedShardDataset(torch.utils.data.Dataset):
    """Rows of an aligned-shard directory, read one Parquet row group at a time (small LRU cache).

    The manifest's tokenizer fingerprints must match the student/teacher tokenizers of the run.
    `block_ranges()` gives contiguous index ranges (row groups) so the sampler can shuffle with locality.
    """

    def __init__(self, directory: str | Path, pair: TokenizerPair, *, max_completion_length: int,
                 max_length: int | None, cache_row_groups: int = 4):
        import pyarrow.parquet as pq

        from gold_pipeline.data.shards import read_manifest, shard_paths

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, kind="aligned")
        check_manifest_fingerprints(self.manifest, pair, self.directory)
        self.pair = pair
        self.max_completion_length = max_completion_length
        self.prompt_budget = prompt_budget(max_length, max_completion_length)
        files = shard_paths(self.directory, self.manifest)
        self._blocks: list[tuple[Path, int, int]] = []  # (file, row group, first global index)
        self._starts: list[int] = []
        total = 0
        for path in files:
            if not path.exists():
                raise GoldInputError(f"{self.directory}/manifest.json lists {path.name}, which is missing; "
                                        "rerun `gold align --resume` to finish the directory.")
            meta = pq.ParquetFile(path).metadata
            for rg in range(meta.num_row_groups):
                self._blocks.append((path, rg, total))
                self._starts.append(total)
                total += meta.row_group(rg).num_rows
        self._length = total
        self._cache: OrderedDict[int, dict[str, list]] = OrderedDict()
        self._cache_size = cache_row_groups
        self.columns = list(ROW_COLUMNS) + [c for c in TOPK_COLUMNS if self._has_column(c)]

    def _has_column(self, name: str) -> bool:
        import pyarrow.parquet as pq

        if not self._blocks:
            return False
        return name in pq.ParquetFile(self._blocks[0][0]).schema_arrow.names

    def __len__(self) -> int:
        return self._length

    def block_ranges(self) -> list[tuple[int, int]]:
        ends = self._starts[1:] + [self._length]
        return [(s, e) for s, e in zip(self._starts, ends) if e > s]

    def _block(self, block_index: int) -> dict[str, list]:
        import pyarrow.parquet as pq

        if block_index in self._cache:
            self._cache.move_to_end(block_index)
            return self._cache[block_index]
        path, rg, _ = self._blocks[block_index]
        table = pq.ParquetFile(path).read_row_group(rg, columns=self.columns)
        block = {name: (_array_rows(table.column(name)) if name in TOPK_COLUMNS else table.column(name).to_pylist())
                 for name in self.columns}
        self._cache[block_index] = block
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return block

    def __getitem__(self, index: int) -> dict:
        import bisect

        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"row {index} is outside {self.directory} ({self._length} rows).")
        block_index = bisect.bisect_right(self._starts, index) - 1
        block = self._block(block_index)
        offset = index - self._starts[block_index]
        row = {name: block[name][offset] for name in self.columns}
        row = fit_row(row, self.pair, self.max_completion_length, self.prompt_budget)
        return row


def _array_rows(column) -> list:
    """A top-K column as one NumPy array per row ((n, K) or (n,)), via data.ragged.arrow_rows.

    The cached top-K is the bulk of a row (2 x K numbers per teacher token); as arrays it is collated without a
    Python loop over its numbers, and accelerate's device transfer treats each array as one leaf. A column with
    null rows or ragged inner lists stays Python lists."""
    if column.null_count:
        return column.to_pylist()
    try:
        return arrow_rows(column)
    except RaggedError:
        return column.to_pylist()


def check_manifest_fingerprints(manifest: dict, pair: TokenizerPair, directory: Path) -> None:
    """Refuse aligned shards made with other tokenizers, saying what to change."""
    from gold_pipeline.data.shards import check_fingerprint
    from gold_pipeline.text.tokenizers import tokenizer_fingerprint

    for side, tokenizer in (("student", pair.student_tokenizer), ("teacher", pair.teacher_tokenizer)):
        try:
            check_fingerprint(manifest, f"{side}_tokenizer", tokenizer_fingerprint(tokenizer),
                              name=getattr(tokenizer, "name_or_path", None))
        except ValueError as error:
            raise GoldInputError(
                f"{directory}: {error} (train with the {side} tokenizer the shards were aligned with, or re-run "
                f"`gold align` with this {side} tokenizer)."
            ) from None


def is_aligned_dir(value: Any) -> bool:
    return isinstance(value, (str, Path)) and (Path(value) / "manifest.json").exists()


def build_dataset(data, pair: TokenizerPair, *, max_completion_length: int, max_length: int | None, what: str):
    """The training/eval dataset for `data`: an aligned-shard directory, a raw dataset, or one of ours."""
    if data is None:
        return None
    if isinstance(data, (RawConversationDataset, AlignedShardDataset)):
        dataset = data
    elif is_aligned_dir(data):
        dataset = AlignedShardDataset(data, pair, max_completion_length=max_completion_length, max_length=max_length)
    elif isinstance(data, (str, Path)):
        raise GoldInputError(f"{what}={str(data)!r} is not an aligned-shard directory (no manifest.json); pass a "
                              "directory written by `gold align`, or a datasets.Dataset / list of conversations.")
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        dataset = RawConversationDataset(data, pair, max_completion_length=max_completion_length,
                                         max_length=max_length, what=what)
    else:
        raise GoldInputError(f"{what} must be an aligned-shard directory, a datasets.Dataset or a list of dicts; got "
                        f"{type(data).__name__} (an IterableDataset cannot be resumed exactly).")
    if len(dataset) == 0:
        raise GoldInputError(f"{what} is empty: there is nothing to train or evaluate on; check the dataset path/split "
                              "or the alignment output.")
    return dataset


# ----------------------------------------------------------------------------------------------------------
# Sampler: seeded, epoch-aware, resumable; repeats each prompt num_generations times in a row.
# ----------------------------------------------------------------------------------------------------------


class GenerationGroupSampler(torch.utils.data.Sampler[int]):
    """Indices in a seeded order (seed + epoch) with each index repeated `num_generations` times in a row.

    The order depends only on (seed, epoch), so `Trainer`'s resume (skip the batches already trained)
    restarts at the exact next sample. For shard datasets the order shuffles row groups, then rows inside
    each row group, so reads stay local.
    """

    def __init__(self, dataset, *, num_generations: int, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.num_generations = num_generations
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset) * self.num_generations

    def order(self) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if isinstance(self.dataset, AlignedShardDataset):
            blocks = self.dataset.block_ranges()
            rng.shuffle(blocks)
            out: list[int] = []
            for start, end in blocks:
                part = list(range(start, end))
                rng.shuffle(part)
                out.extend(part)
            return out
        out = list(range(n))
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[int]:
        for index in self.order():
            for _ in range(self.num_generations):
                yield index
