"""Explicit Arrow schemas of every Parquet file gold writes (DESIGN.md §5).

Never infer a schema from the first row: writers build tables against these constants, readers check
`manifest["schema_version"]` against `SCHEMA_VERSION`. Bump `SCHEMA_VERSION` whenever a column is added,
removed, renamed or retyped, so that a consumer refuses old output with a sentence instead of misreading it.

Per-token columns of one row all have the same length as that side's completion ids:
  student_completion_ids, student_group_ids                       (n,)   n = student completion tokens
  teacher_completion_ids, teacher_group_ids, teacher_token_logprobs (m,)   m = teacher completion tokens
  teacher_topk_ids, teacher_topk_logprobs                          (m, K) as list<list<...>>
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

IDS = pa.list_(pa.int32())
MESSAGE = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])
MESSAGES = pa.list_(MESSAGE)
# Top-k log-probs are stored as float16: 2 bytes per entry keeps K = 64 under 400 bytes per teacher token
# (ids 4 B + log-prob 2 B per entry). float16 resolves log-probs to ~0.01 nats near -10, far below sampling noise.
TOPK_IDS = pa.list_(IDS)
TOPK_LOGPROBS = pa.list_(pa.list_(pa.float16()))
TOKEN_LOGPROBS = pa.list_(pa.float32())

# Values of the aligned `status` column (from alignment.Alignment.status). "ok" means every completion byte
# is covered by groups; anything else means a tail was excluded (group id -1) and counted in the manifest.
ALIGN_STATUSES = ("ok", "mismatch", "invalid_utf8_tail")


def _field(name: str, type_: pa.DataType, nullable: bool = False, doc: str = "") -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc} if doc else None)


ALIGNED_SCHEMA = pa.schema(
    [
        _field("sample_id", pa.string(), doc="sha256 of canonical JSON of the prompt messages + generation index"),
        _field("row_index", pa.int64(), doc="0-based row of the source dataset (or teacher cache)"),
        _field("generation_index", pa.int32(), doc="n-th completion of the same prompt"),
        _field("completion_text", pa.string(), doc="completion text (cut at the kept bytes when truncated)"),
        _field("student_prompt_ids", IDS, doc="prompt rendered with the student's own chat template"),
        _field("student_completion_ids", IDS, doc="completion tokenized on its own + end-of-turn ids"),
        _field("teacher_prompt_ids", IDS, doc="prompt rendered with the teacher's own chat template"),
        _field("teacher_completion_ids", IDS, doc="completion tokenized on its own + end-of-turn ids"),
        _field("student_group_ids", IDS, doc="(n,) group per student completion token; -1 = excluded"),
        _field("teacher_group_ids", IDS, doc="(m,) group per teacher completion token; -1 = excluded"),
        _field("num_groups", pa.int32(), doc="number of aligned groups G (ids 0..G-1)"),
        _field("status", pa.string(), doc="alignment status: ok | mismatch | invalid_utf8_tail"),
        _field("truncated", pa.bool_(), doc="completion cut at a common group boundary to fit max_length"),
        _field("excluded_student_tokens", pa.int32(), doc="non-special student tokens with group -1"),
        _field("excluded_teacher_tokens", pa.int32(), doc="non-special teacher tokens with group -1"),
        _field("finish_reason", pa.string(), nullable=True, doc="teacher-cache finish reason (stop|length)"),
        _field("teacher_token_logprobs", TOKEN_LOGPROBS, nullable=True, doc="(m,) from a teacher cache"),
        _field("teacher_topk_ids", TOPK_IDS, nullable=True, doc="(m, K) from a teacher cache"),
        _field("teacher_topk_logprobs", TOPK_LOGPROBS, nullable=True, doc="(m, K) from a teacher cache"),
    ],
    metadata={"gold.kind": "aligned", "gold.schema_version": str(SCHEMA_VERSION)},
)

TEACHER_SCHEMA = pa.schema(
    [
        _field("sample_id", pa.string(), doc="sha256 of canonical JSON of the prompt messages + generation index"),
        _field("row_index", pa.int64(), doc="0-based row of the prompt dataset"),
        _field("generation_index", pa.int32(), doc="n-th sample of the same prompt (0..num_generations-1)"),
        _field("messages", MESSAGES, doc="prompt messages (no completion)"),
        _field("prompt_text", pa.string(), nullable=True, doc="prompt rendered with the teacher's template"),
        _field("completion_text", pa.string(), doc="decoded completion (without end-of-turn special tokens)"),
        _field("teacher_prompt_ids", IDS, doc="prompt ids fed to the teacher"),
        _field("teacher_completion_ids", IDS,
               doc="generated ids, including the final end-of-turn/EOS id when finish_reason is 'stop'"),
        _field("teacher_token_logprobs", TOKEN_LOGPROBS, nullable=True, doc="(m,) log-prob of each completion id"),
        _field("teacher_topk_ids", TOPK_IDS, nullable=True, doc="(m, K) ids of the K most likely tokens"),
        _field("teacher_topk_logprobs", TOPK_LOGPROBS, nullable=True, doc="(m, K) their log-probs, descending"),
        _field("finish_reason", pa.string(), nullable=True, doc="stop | length"),
    ],
    metadata={"gold.kind": "teacher", "gold.schema_version": str(SCHEMA_VERSION)},
)

VOCAB_MAP_SCHEMA = pa.schema(
    [
        _field("student_id", pa.int32(), doc="student token id"),
        _field("teacher_id", pa.int32(), doc="teacher token id with byte-identical non-empty token bytes"),
    ],
    metadata={"gold.kind": "vocab_map", "gold.schema_version": str(SCHEMA_VERSION)},
)

PROJECTION_SCHEMA = pa.schema(
    [
        _field("student_id", pa.int32(), doc="student token id (every id with bytes; special tokens have no row)"),
        _field("kind", pa.string(), doc="matched | projected | too_long | unencodable (text.projection.KINDS)"),
        _field("teacher_ids", IDS, doc="teacher tokens spelling the student token's bytes, in order"),
        _field("weights", pa.list_(pa.float32()), doc="X-Token projection weights of teacher_ids (sum 1)"),
    ],
    metadata={"gold.kind": "projection", "gold.schema_version": str(SCHEMA_VERSION)},
)

SCHEMAS: dict[str, pa.Schema] = {"aligned": ALIGNED_SCHEMA, "teacher": TEACHER_SCHEMA, "vocab_map": VOCAB_MAP_SCHEMA,
                                 "projection": PROJECTION_SCHEMA}


def schema_for(kind: str) -> pa.Schema:
    """The schema constant of an output kind ("aligned", "teacher", "vocab_map", "projection")."""
    if kind not in SCHEMAS:
        raise ValueError(f"Unknown output kind {kind!r}; expected one of {sorted(SCHEMAS)}.")
    return SCHEMAS[kind]


def describe_schema(schema: pa.Schema) -> list[dict[str, str]]:
    """[{name, type, nullable, doc}] for manifests and docs."""
    return [
        {
            "name": field.name,
            "type": str(field.type),
            "nullable": str(field.nullable).lower(),
            "doc": (field.metadata or {}).get(b"doc", b"").decode(),
        }
        for field in schema
    ]
