"""One source row as gold reads it: its validation and its parsed form (the one owner of row rules).

Every entry point reads rows through `split_record`: `gold align`, `gold teacher-cache`, `gold train --dataset`
and `GOLDTrainer(train_dataset=list | datasets.Dataset)`, so a row that passes one passes all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gold_pipeline.errors import InvalidRow


@dataclass
class Example:
    """One prompt + completion. extra: teacher-cache columns (numpy arrays) when read from a teacher cache."""

    sample_id: str
    prompt_messages: list[dict[str, str]]
    completion_text: str | None
    row_index: int  # 0-based position in the source stream (rows [k*S, (k+1)*S) form shard k)
    generation_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


SKIP_HINT = "Or pass --skip-invalid to skip such rows (they are counted per reason in the manifest)."

# reason -> (what is wrong, how to fix it)
INVALID_REASONS: dict[str, tuple[str, str]] = {
    "invalid_json": ("is not valid JSON", "Fix the line so that it holds one JSON object."),
    "invalid_utf8": ("is not valid UTF-8", "Re-encode the file as UTF-8 (or fix that line's bytes)."),
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


def invalid_row(row_index: int, location: str, field_name: str, reason: str, detail: str = "",
                hint: str = SKIP_HINT) -> InvalidRow:
    problem, fix = INVALID_REASONS[reason]
    where = f"Row {row_index}" + (f" ({location})" if location else "")
    detail = f" ({detail})" if detail else ""
    message = f"{where}: field `{field_name}` {problem}{detail}. {fix}" + (f" {hint}" if hint else "")
    return InvalidRow(row_index=row_index, reason=reason, field=field_name, message=message)


class RowError(Exception):
    """Raised by split_record: which field of a row is wrong and why (a key of INVALID_REASONS)."""

    def __init__(self, field_name: str, reason: str, detail: str = ""):
        self.field_name, self.reason, self.detail = field_name, reason, detail


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError(field_name, "messages_not_a_list", f"got {_type_name(value)}")
    messages = []
    for position, message in enumerate(value):
        where = f"{field_name}[{position}]"
        if not isinstance(message, dict):
            raise RowError(where, "message_not_an_object", f"got {_type_name(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise RowError(f"{where}.role", "bad_role", f"got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", "non_string_content", f"got {_type_name(content)}")
        messages.append({"role": role, "content": content})
    return messages


def split_record(record: Any, *, require_completion: bool = True) -> tuple[list[dict[str, str]], str | None]:
    """(prompt messages, completion text or None) of one raw row; raises RowError when invalid."""
    if not isinstance(record, dict):
        raise RowError("<row>", "not_an_object", f"got {_type_name(record)}")
    if record.get("messages") is not None:
        messages = _parse_messages(record["messages"], "messages")
        if not messages:
            raise RowError("messages", "empty_messages")
        if messages[-1]["role"] == "assistant":
            prompt, completion = messages[:-1], messages[-1]["content"]
            if not prompt:
                raise RowError("messages", "empty_prompt", "only an assistant message")
            if completion == "":
                raise RowError(f"messages[{len(messages) - 1}].content", "empty_completion")
            return prompt, completion
        if require_completion:
            has_assistant = any(m["role"] == "assistant" for m in messages)
            reason = "messages_after_assistant" if has_assistant else "no_assistant_turn"
            raise RowError("messages", reason, f"last role is {messages[-1]['role']!r}")
        return messages, None
    if "prompt" not in record or record["prompt"] is None:
        raise RowError("messages", "no_messages", f"row keys: {sorted(record)[:8]}")
    prompt_value = record["prompt"]
    if isinstance(prompt_value, str):
        if prompt_value == "":
            raise RowError("prompt", "empty_prompt")
        prompt = [{"role": "user", "content": prompt_value}]
    elif isinstance(prompt_value, list):
        prompt = _parse_messages(prompt_value, "prompt")
        if not prompt:
            raise RowError("prompt", "empty_prompt")
    else:
        raise RowError("prompt", "wrong_type", f"got {_type_name(prompt_value)}")
    completion_value = record.get("completion")
    if completion_value is None:
        if require_completion:
            raise RowError("completion", "no_completion")
        return prompt, None
    if isinstance(completion_value, str):
        completion = completion_value
    elif isinstance(completion_value, list):
        turns = _parse_messages(completion_value, "completion")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError("completion", "completion_not_one_assistant_turn", f"{len(turns)} message(s)")
        completion = turns[0]["content"]
    else:
        raise RowError("completion", "wrong_type", f"got {_type_name(completion_value)}")
    if completion == "":
        raise RowError("completion", "empty_completion")
    return prompt, completion
