"""One tokenizer with everything alignment needs (`TokenizerSide`), and the student/teacher pair.

The one owner of: a side's byte table and end-of-turn ids, its stop ids (what ends a sampled completion), its
pad id, and the tokenizer record written into every manifest. `gold align`, `gold teacher-cache`, training and
`gold inspect` all build sides here.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gold_pipeline.text.bytes import ByteTable, byte_table
from gold_pipeline.text.encode import end_of_turn_ids
from gold_pipeline.text.tokenizers import load_tokenizer, tokenizer_fingerprint


def eos_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS id(s) as a list (transformers allows an int, a list or None)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    values = eos if isinstance(eos, (list, tuple)) else [eos]
    return [int(value) for value in values if value is not None]


def stop_token_ids(tokenizer, eot_ids: list[int] | None = None) -> list[int]:
    """Ids that end a sampled completion, in order: the first end-of-turn id of the chat template, then EOS.
    Empty when the tokenizer has neither (callers that must stop say so)."""
    eot = list(end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids)
    ids = eot[:1]
    for value in eos_token_ids(tokenizer):
        if value not in ids:
            ids.append(value)
    return ids


def pad_token_id(tokenizer) -> int:
    """Pad id for batching: the tokenizer's pad token, else its EOS, else 0 (padding is always masked)."""
    for value in (tokenizer.pad_token_id, *eos_token_ids(tokenizer), 0):
        if isinstance(value, int):
            return value
    return 0


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker process needs to load one side exactly as the main process did."""

    name: str
    revision: str | None = None
    chat_template: str | None = None  # template text (read from a file), or None


@dataclass(frozen=True, eq=False)
class TokenizerSide:
    """One tokenizer and what is derived from it once: its byte table, end-of-turn, stop and pad ids."""

    tokenizer: Any
    table: ByteTable
    eot_ids: np.ndarray  # (E,) int32 end-of-turn ids appended to a finished completion
    stop_ids: tuple[int, ...]  # ids that end a sampled completion (stop_token_ids)
    pad_id: int

    @classmethod
    def of(cls, tokenizer) -> TokenizerSide:
        eot = list(end_of_turn_ids(tokenizer))
        return cls(tokenizer=tokenizer, table=byte_table(tokenizer), eot_ids=np.asarray(eot, dtype=np.int32),
                   stop_ids=tuple(stop_token_ids(tokenizer, eot)), pad_id=pad_token_id(tokenizer))  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return len(self.table.token_bytes)


@functools.lru_cache(maxsize=8)
def load_side(spec: TokenizerSpec) -> TokenizerSide:
    """The side of a spec (cached per process: loading a 100k+ vocabulary takes seconds)."""
    return TokenizerSide.of(load_tokenizer(spec.name, revision=spec.revision, chat_template=spec.chat_template))


def tokenizer_record(name: str, revision: str | None, side: TokenizerSide,
                     template_file: str | None = None) -> dict[str, Any]:
    """Fingerprint entry of one tokenizer for manifests (the same layout for every stage)."""
    tokenizer = side.tokenizer
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return {
        "name": name,
        "revision": revision,
        "sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": side.vocab_size,
        "chat_template_source": getattr(tokenizer, "gold_chat_template_source", None),
        "chat_template_file": str(Path(template_file).resolve()) if template_file else None,
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "end_of_turn_ids": side.eot_ids.tolist(),
    }


@dataclass(frozen=True, eq=False)
class TokenizerPair:
    """The student and teacher sides of a distillation run."""

    student: TokenizerSide
    teacher: TokenizerSide
    same_tokenizer: bool

    @classmethod
    def build(cls, student_tokenizer, teacher_tokenizer) -> TokenizerPair:
        same = teacher_tokenizer is student_tokenizer or (
            tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(student_tokenizer))
        student = TokenizerSide.of(student_tokenizer)
        return cls(student, student if teacher_tokenizer is student_tokenizer else TokenizerSide.of(teacher_tokenizer),
                   same)  # fmt: skip

    def end_of_turn_pair(self, merge_strategy: str = "first") -> np.ndarray:
        """(1, 2) int64 [student_id, teacher_id]: the end-of-turn ids whose merged columns say "the turn ends
        here" in a stop group (collate.stop_group_rows): each side's first end-of-turn id under the first-position
        merge, its last under the last-position one. (0, 2) when a side has none.

        End-of-turn tokens are special tokens without bytes, so the vocab map never pairs them (cl100k's
        <|endoftext|> and Qwen's <|im_end|> spell nothing alike); without this pair a stop group's probabilities
        all fall to the ULD part, which matches sorted values and cannot teach the student when to stop."""
        student, teacher = self.student.eot_ids, self.teacher.eot_ids
        if not student.size or not teacher.size:
            return np.zeros((0, 2), dtype=np.int64)
        at = 0 if merge_strategy == "first" else -1
        return np.array([[student[at], teacher[at]]], dtype=np.int64)

    def side(self, name: str) -> TokenizerSide:
        """"student" or "teacher"."""
        return self.student if name == "student" else self.teacher

    # the flat names the trainer and the tests read
    student_tokenizer = property(lambda self: self.student.tokenizer)
    teacher_tokenizer = property(lambda self: self.teacher.tokenizer)
    student_table = property(lambda self: self.student.table)
    teacher_table = property(lambda self: self.teacher.table)
    student_eot_ids = property(lambda self: self.student.eot_ids.tolist())
    teacher_eot_ids = property(lambda self: self.teacher.eot_ids.tolist())
    student_pad_id = property(lambda self: self.student.pad_id)
    teacher_pad_id = property(lambda self: self.teacher.pad_id)
    student_vocab_size = property(lambda self: self.student.vocab_size)
    teacher_vocab_size = property(lambda self: self.teacher.vocab_size)
