"""Training data: aligned rows from shards (streamed) or raw conversations (aligned on the fly), and the
collator that turns a slice of rows into model inputs plus FLAT completion tensors with global group ids.

A *row* is a plain dict with the aligned-shard columns (DESIGN §5):
  sample_id, completion_text, student_prompt_ids, student_completion_ids, teacher_prompt_ids,
  teacher_completion_ids, student_group_ids, teacher_group_ids (+ optional teacher_topk_ids/logprobs)
and a few training-only keys: `stopped` (the completion ends with end-of-turn ids on both sides).

The DataLoader yields lists of rows (identity collate); the trainer builds the optimizer window from them
(on-policy rows replace off-policy ones) and only then calls `collate_rows`.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs")


# ----------------------------------------------------------------------------------------------------------
# The tokenizer pair: everything alignment and collation need, built once.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerPair:
    """Student and teacher tokenizers with their byte tables and end-of-turn ids."""

    student_tokenizer: Any
    teacher_tokenizer: Any
    student_table: Any
    teacher_table: Any
    student_eot_ids: list[int]
    teacher_eot_ids: list[int]
    student_pad_id: int
    teacher_pad_id: int
    same_tokenizer: bool

    @classmethod
    def build(cls, student_tokenizer, teacher_tokenizer) -> TokenizerPair:
        from gold_pipeline.byte_tables import byte_table
        from gold_pipeline.tokenization import end_of_turn_ids, tokenizer_fingerprint

        same = teacher_tokenizer is student_tokenizer or tokenizer_fingerprint(
            teacher_tokenizer
        ) == tokenizer_fingerprint(student_tokenizer)
        return cls(
            student_tokenizer=student_tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            student_table=byte_table(student_tokenizer),
            teacher_table=byte_table(teacher_tokenizer),
            student_eot_ids=list(end_of_turn_ids(student_tokenizer)),
            teacher_eot_ids=list(end_of_turn_ids(teacher_tokenizer)),
            student_pad_id=_pad_id(student_tokenizer),
            teacher_pad_id=_pad_id(teacher_tokenizer),
            same_tokenizer=same,
        )

    @property
    def student_vocab_size(self) -> int:
        return len(self.student_table.token_bytes)

    @property
    def teacher_vocab_size(self) -> int:
        return len(self.teacher_table.token_bytes)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
    return 0


def ends_with(ids: Sequence[int], suffix: Sequence[int]) -> bool:
    return len(suffix) > 0 and len(ids) >= len(suffix) and list(ids[len(ids) - len(suffix) :]) == list(suffix)


# ----------------------------------------------------------------------------------------------------------
# Raw conversations -> aligned rows (the same alignment code as `gold align` and the rollouts).
# ----------------------------------------------------------------------------------------------------------


def split_conversation(record: dict, index: int) -> tuple[list[dict], str]:
    """(prompt messages, completion text) of one raw record: `messages` (last one from the assistant) or
    `prompt` (text or messages) + `completion` (text or messages)."""
    if "messages" in record and record["messages"] is not None:
        messages = list(record["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"train row {index}: the last message must come from the assistant (it is the completion "
                "to distill); end every conversation with an assistant message or use prompt/completion columns."
            )
        return [dict(m) for m in messages[:-1]], str(messages[-1]["content"])
    if "prompt" in record:
        prompt = record["prompt"]
        prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        completion = record.get("completion", "")
        if isinstance(completion, list):
            completion = "".join(str(m["content"]) for m in completion)
        return [dict(m) for m in prompt_messages], str(completion or "")
    raise ValueError(
        f"train row {index}: has neither `messages` nor `prompt` (columns: {sorted(record)}); give conversations "
        "as messages=[..., {'role': 'assistant', ...}] or as prompt/completion."
    )


def utf8_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def prompt_budget(max_length: int | None, max_completion_length: int) -> int | None:
    return None if max_length is None else max(1, max_length - max_completion_length)


def keep_end(ids: list[int], budget: int | None) -> list[int]:
    """Prompts keep their end (the generation marker) when cut to the budget."""
    return ids if budget is None or len(ids) <= budget else ids[-budget:]


class RawConversationDataset(torch.utils.data.Dataset):
    """A datasets.Dataset / list of dicts with `messages` or `prompt`/`completion`, aligned on the fly."""

    def __init__(self, records, pair: TokenizerPair, *, max_completion_length: int, max_length: int | None):
        self.records = records
        self.pair = pair
        self.max_completion_length = max_completion_length
        self.prompt_budget = prompt_budget(max_length, max_completion_length)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from gold_pipeline.align_job import align_example
        from gold_pipeline.shards import sample_id
        from gold_pipeline.sources import Example

        record = self.records[int(index)]
        prompt_messages, completion_text = split_conversation(record, int(index))
        example = Example(sample_id=sample_id(prompt_messages), prompt_messages=prompt_messages,
                          completion_text=completion_text, row_index=int(index))
        row = align_example(example, self.pair.student_tokenizer, self.pair.teacher_tokenizer,
                            self.pair.student_table, self.pair.teacher_table, None,
                            student_eot_ids=np.asarray(self.pair.student_eot_ids, dtype=np.int32),
                            teacher_eot_ids=np.asarray(self.pair.teacher_eot_ids, dtype=np.int32))
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

        from gold_pipeline.shards import read_manifest, shard_paths

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
                raise FileNotFoundError(f"{self.directory}/manifest.json lists {path.name}, which is missing; "
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
        block = {name: (_numpy_rows(table.column(name)) if name in TOPK_COLUMNS else table.column(name).to_pylist())
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


def _numpy_rows(column) -> list:
    """A top-K column (list<list<x>> or list<x> per row) as one NumPy array per row: (n, K) or (n,).

    The cached top-K is the bulk of a row (2 x K numbers per teacher token); as arrays it is collated without a
    Python loop over its numbers, and accelerate's device transfer treats each array as one leaf instead of walking
    every number of nested lists. A column with null rows or ragged inner lists stays Python lists."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count or not pa.types.is_list(column.type):
        return column.to_pylist()
    tokens = column.flatten()  # (Nt,) per-token values: list<x> of K entries, or x
    if pa.types.is_list(tokens.type):
        widths = tokens.value_lengths().to_numpy(zero_copy_only=False)
        numbers = tokens.flatten()
        if tokens.null_count or numbers.null_count or (widths.size and (widths != widths[0]).any()):
            return column.to_pylist()
        k = int(widths[0]) if widths.size else 0
        flat = numbers.to_numpy(zero_copy_only=False).reshape(len(tokens), k)  # (Nt, K)
    else:
        if tokens.null_count:
            return column.to_pylist()
        flat = tokens.to_numpy(zero_copy_only=False)  # (Nt,)
    bounds = np.concatenate([[0], np.cumsum(column.value_lengths().to_numpy(zero_copy_only=False))])
    return [flat[bounds[i]: bounds[i + 1]] for i in range(len(column))]


def fit_row(row: dict, pair: TokenizerPair, max_completion_length: int, budget: int | None) -> dict:
    """Cut a stored row to this run's limits (prompt keeps its end; completion cut at a common group
    boundary so that both sides keep the same bytes) and mark whether it ends with end-of-turn ids."""
    row = dict(row)
    row["student_prompt_ids"] = keep_end(list(row["student_prompt_ids"]), budget)
    row["teacher_prompt_ids"] = keep_end(list(row["teacher_prompt_ids"]), budget)
    s_ids, t_ids = list(row["student_completion_ids"]), list(row["teacher_completion_ids"])
    s_groups, t_groups = list(row["student_group_ids"]), list(row["teacher_group_ids"])
    if len(s_ids) > max_completion_length or len(t_ids) > max_completion_length:
        # Keep the groups that end within both limits; everything after is dropped on both sides.
        keep_groups = _groups_within(s_groups, max_completion_length) & _groups_within(t_groups, max_completion_length)
        s_n = _prefix_len(s_groups, keep_groups, max_completion_length)
        t_n = _prefix_len(t_groups, keep_groups, max_completion_length)
        s_ids, s_groups, t_ids, t_groups = s_ids[:s_n], s_groups[:s_n], t_ids[:t_n], t_groups[:t_n]
        s_groups = [g if g in keep_groups else -1 for g in s_groups]
        t_groups = [g if g in keep_groups else -1 for g in t_groups]
        row["truncated"] = True
    row.update(student_completion_ids=s_ids, teacher_completion_ids=t_ids, student_group_ids=s_groups,
               teacher_group_ids=t_groups)
    for name in TOPK_COLUMNS:
        if row.get(name) is not None:
            row[name] = row[name][: len(t_ids)]
    row["num_groups"] = max([g for g in s_groups if g >= 0], default=-1) + 1
    return row


def _groups_within(groups: list[int], limit: int) -> set[int]:
    last_pos: dict[int, int] = {}
    for pos, g in enumerate(groups):
        if g >= 0:
            last_pos[g] = pos
    return {g for g, pos in last_pos.items() if pos < limit}


def _prefix_len(groups: list[int], keep: set[int], limit: int) -> int:
    last = -1
    for pos, g in enumerate(groups[:limit]):
        if g in keep:
            last = pos
    return last + 1


def check_manifest_fingerprints(manifest: dict, pair: TokenizerPair, directory: Path) -> None:
    """Refuse aligned shards made with other tokenizers, saying what to change."""
    from gold_pipeline.shards import check_fingerprint
    from gold_pipeline.tokenization import tokenizer_fingerprint

    for side, tokenizer in (("student", pair.student_tokenizer), ("teacher", pair.teacher_tokenizer)):
        try:
            check_fingerprint(manifest, f"{side}_tokenizer", tokenizer_fingerprint(tokenizer),
                              name=getattr(tokenizer, "name_or_path", None))
        except ValueError as error:
            raise ValueError(
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
        raise ValueError(f"{what}={str(data)!r} is not an aligned-shard directory (no manifest.json); pass a "
                         "directory written by `gold align`, or a datasets.Dataset / list of conversations.")
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        dataset = RawConversationDataset(data, pair, max_completion_length=max_completion_length,
                                         max_length=max_length)
    else:
        raise TypeError(f"{what} must be an aligned-shard directory, a datasets.Dataset or a list of dicts; got "
                        f"{type(data).__name__} (an IterableDataset cannot be resumed exactly).")
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty: there is nothing to train or evaluate on; check the dataset path/split "
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


def identity_collate(rows: list[dict]) -> list[dict]:
    return rows


# ----------------------------------------------------------------------------------------------------------
# Collation: rows -> padded model inputs + flat completion tensors with global group ids.
# ----------------------------------------------------------------------------------------------------------


def stop_group_rows(rows: list[dict], pair: TokenizerPair) -> list[dict]:
    """Give the end-of-turn tokens of rows that end with them on both sides one extra aligned group
    (used when uld_skip_student_eos = uld_skip_teacher_eos = False)."""
    out = []
    for row in rows:
        s_ids, t_ids = row["student_completion_ids"], row["teacher_completion_ids"]
        if ends_with(s_ids, pair.student_eot_ids) and ends_with(t_ids, pair.teacher_eot_ids):
            row = dict(row)
            g = int(row.get("num_groups", max(row["student_group_ids"] + [-1]) + 1))
            ns, nt = len(pair.student_eot_ids), len(pair.teacher_eot_ids)
            row["student_group_ids"] = list(row["student_group_ids"][:-ns]) + [g] * ns
            row["teacher_group_ids"] = list(row["teacher_group_ids"][:-nt]) + [g] * nt
            row["num_groups"] = g + 1
        out.append(row)
    return out


def _side_inputs(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded to a common width P, completions right-padded to L: every row's completion starts
    at column P, so logits at columns P-1 .. P+L-2 predict the completion tokens of all rows."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    L = max(max((len(c) for c in completions), default=0), 1)
    input_ids = torch.full((B, P + L), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, P + L), dtype=torch.long)
    completion_mask = torch.zeros((B, L), dtype=torch.bool)  # (B, L)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, P - len(p) : P] = 1
        if c:
            input_ids[b, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            attention_mask[b, P : P + len(c)] = 1
            completion_mask[b, : len(c)] = True
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_mask": completion_mask,
        "prompt_width": torch.tensor(P),
    }


def _flat_groups(rows: list[dict], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) token ids and (N,) global group ids of one side: row offsets added, -1 kept."""
    ids, groups, offset = [], [], 0
    for row in rows:
        g = np.asarray(row[f"{side}_group_ids"], dtype=np.int64)
        ids.extend(row[f"{side}_completion_ids"])
        groups.append(np.where(g >= 0, g + offset, -1))
        offset += int(row["num_groups"])
    flat_groups = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    return torch.tensor(ids, dtype=torch.long), torch.from_numpy(flat_groups)


def collate_rows(rows: list[dict], pair: TokenizerPair) -> dict[str, Any]:
    """One micro-batch: student_*/teacher_* padded inputs, flat completion ids and global group ids.

    Keys (B rows, Ts/Tt sequence lengths, Ns/Nt flat completion tokens, G groups):
      input_ids, attention_mask, position_ids (B, Ts); completion_mask (B, Ls); prompt_width
      teacher_input_ids, teacher_attention_mask, teacher_position_ids (B, Tt); teacher_completion_mask (B, Lt)
      student_token_ids, student_group_ids (Ns,); teacher_token_ids, teacher_group_ids (Nt,); num_groups (G)
      teacher_topk_ids, teacher_topk_logprobs (Nt, K) when every row carries them
      completion_bytes (B,); rows (the rows themselves, for logging)
    """
    for row in rows:
        if "num_groups" not in row:
            row["num_groups"] = max(list(row["student_group_ids"]) + [-1]) + 1
    student = _side_inputs([r["student_prompt_ids"] for r in rows], [r["student_completion_ids"] for r in rows],
                           pair.student_pad_id)
    teacher = _side_inputs([r["teacher_prompt_ids"] for r in rows], [r["teacher_completion_ids"] for r in rows],
                           pair.teacher_pad_id)
    student_token_ids, student_group_ids = _flat_groups(rows, "student")
    teacher_token_ids, teacher_group_ids = _flat_groups(rows, "teacher")
    batch: dict[str, Any] = dict(student)
    batch.update({f"teacher_{k}": v for k, v in teacher.items()})
    batch.update(
        student_token_ids=student_token_ids,
        student_group_ids=student_group_ids,
        teacher_token_ids=teacher_token_ids,
        teacher_group_ids=teacher_group_ids,
        num_groups=torch.tensor(sum(int(r["num_groups"]) for r in rows)),
        completion_bytes=torch.tensor([len(utf8_bytes(r["completion_text"])) for r in rows]),
        rows=rows,
    )
    if rows and all(r.get(c) is not None for r in rows for c in TOPK_COLUMNS):
        K = max((len(r["teacher_topk_ids"][0]) for r in rows if len(r["teacher_topk_ids"])), default=0)

        def flat(name: str, dtype) -> np.ndarray:  # rows' (n_r, K) or (n_r,) values stacked: (Nt, K) or (Nt,)
            parts = [np.asarray(r[name], dtype=dtype) for r in rows]
            return np.concatenate([p.reshape(-1, K) if name != "teacher_token_logprobs" else p for p in parts])

        batch["teacher_topk_ids"] = torch.from_numpy(flat("teacher_topk_ids", np.int64))  # (Nt, K)
        batch["teacher_topk_logprobs"] = torch.from_numpy(flat("teacher_topk_logprobs", np.float32))  # (Nt, K)
        batch["teacher_token_logprobs"] = torch.from_numpy(flat("teacher_token_logprobs", np.float32))  # (Nt,)
    return batch
