"""`gold inspect DIR`: what is in an aligned (or teacher-cache) output, computed from the Parquet files.

Counts come from the shards themselves (not only from the manifest), read with pyarrow + numpy. Rendering the
most frequent multi-token groups as text loads the tokenizers named in the manifest (pkg: names load offline);
when they cannot be loaded the groups are shown as ids and the report says why.

Projection coverage (issue 14): the share of student tokens, and of numeral tokens, that are matched or projected
in vocab_map/projection.parquet (what the projection loss can compare token by token), over the vocabulary and
weighted by how often each id occurs in the stored student completions. Outputs written before projection tables
existed get a note saying how to make one instead of an error.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gold_pipeline.align.config import PROJECTION_FILE
from gold_pipeline.data.shards import iter_shard_batches, read_manifest, verify_shards
from gold_pipeline.errors import GoldInputError
from gold_pipeline.text.bytes import strips_dummy_prefix

SIDES = ("student", "teacher")


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """list<int32> column -> (values (N,), lengths (rows,))."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return array.flatten().to_numpy(zero_copy_only=False), lengths


def _global_groups(group_ids: np.ndarray, lengths: np.ndarray, num_groups: np.ndarray) -> np.ndarray:
    """(N,) group ids made global across rows (row offsets added); -1 stays -1."""
    offsets = np.concatenate([[0], np.cumsum(num_groups)[:-1]]).astype(np.int64)  # (rows,)
    shifted = group_ids.astype(np.int64) + np.repeat(offsets, lengths)
    return np.where(group_ids >= 0, shifted, -1)


def sizes_per_group(group_ids: np.ndarray, lengths: np.ndarray, num_groups: np.ndarray) -> np.ndarray:
    """Tokens in each aligned group, all rows together.

    group_ids: (N,) per-row group ids (0,0,1,2,2,...; -1 = excluded) of rows laid end to end; lengths: (rows,)
    tokens per row; num_groups: (rows,) groups per row. Returns (G,) int64 (excluded tokens are in no group).
    """
    global_ids = _global_groups(group_ids, lengths, num_groups)  # (N,)
    return np.bincount(global_ids[global_ids >= 0], minlength=int(np.sum(num_groups)))  # (G,)


def group_size_counts(sizes: np.ndarray) -> list[int]:
    """(G,) tokens per group -> counts[i] = number of groups of i + 1 tokens (up to the largest group)."""
    return np.bincount(sizes, minlength=1)[1:].astype(np.int64).tolist() if len(sizes) else []


def _add_counts(total: list[int], more: list[int]) -> list[int]:
    """Element-wise sum of two group-size count lists of any lengths."""
    longer, shorter = (total, more) if len(total) >= len(more) else (more, total)
    return [a + (shorter[i] if i < len(shorter) else 0) for i, a in enumerate(longer)]


def _piece(token: bytes) -> str:
    return repr(token.decode("utf-8", errors="backslashreplace"))


def _load_tables(manifest: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Byte tables of the manifest's tokenizers, or ({}, reason) when they cannot be loaded."""
    try:
        from gold_pipeline.text.pair import TokenizerSpec, load_side

        tables = {}
        for side in SIDES:
            record = manifest["fingerprints"][f"{side}_tokenizer"]
            tables[side] = load_side(TokenizerSpec(record["name"], record.get("revision"), None)).table
            if len(tables[side].token_bytes) != record.get("vocab_size"):
                return {}, f"the {side} tokenizer {record['name']!r} now has another vocabulary size than recorded"
        return tables, None
    except Exception as error:  # hub unreachable, package missing: the counts are still shown
        return {}, f"tokenizers not loaded ({error.__class__.__name__}: {str(error).splitlines()[0][:200]})"


def group_pieces(student: list[bytes], teacher: list[bytes], tables: dict[str, Any]):
    """The token bytes of a stored group as text pieces per side, or None when the two sides spell different text.

    A group at the start of a completion may carry a SentencePiece dummy-prefix space on one side: its first
    token's leading space is no text, the alignment strips it (text.bytes.strips_dummy_prefix), and so does this.
    """
    joined_s, joined_t = b"".join(student), b"".join(teacher)
    if joined_s == joined_t:
        return student, teacher
    for name, mine, other, mine_joined, other_joined in (("student", student, teacher, joined_s, joined_t),
                                                         ("teacher", teacher, student, joined_t, joined_s)):
        added = strips_dummy_prefix(tables[name], text_starts_with_space=other_joined[:1] == b" ")
        if added and mine_joined[:1] == b" " and mine_joined[1:] == other_joined:
            stripped = [mine[0][1:], *mine[1:]]
            return (stripped, other) if name == "student" else (other, stripped)
    return None


COVERED_KINDS = ("matched", "projected")  # text.projection.KINDS the projection loss compares token by token


def is_numeral(token: bytes) -> bool:
    """Token bytes that are all ASCII digits once the leading-space marker (byte-level "Ġ", SentencePiece "▁",
    already a b" " in a `text.bytes.ByteTable`) is stripped: b"7", b" 123"; not b"", b" ", b"1.5", b"\xd9\xa3"."""
    text = token[1:] if token[:1] == b" " else token
    return text.isdigit()  # bytes.isdigit: ASCII digits only, False when empty


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def projection_coverage(out_dir: str | Path, manifest: dict[str, Any], tables: dict[str, Any],
                        student_id_counts: np.ndarray | None) -> dict[str, Any]:
    """Coverage of the student vocabulary by matched ∪ projected rows of the output's projection table.

    student_id_counts: (Vs,) occurrences of each student id in the stored completions (None: not weighed).
    Numeral shares need the student byte table (`tables["student"]`); without it they come from the manifest's
    stats.projection.coverage (same definition) and `numeral_source` says so.
    """
    path = Path(out_dir) / manifest["files"].get("projection", PROJECTION_FILE)
    if not path.exists():
        return {"present": False, "path": str(path),
                "note": f"no projection table ({path.name} is absent: this output predates projection tables); "
                        f"rerun `gold align` on it (--overwrite) to write {PROJECTION_FILE}."}
    frame = pq.read_table(path, columns=["student_id", "kind"])
    student_ids = frame.column("student_id").to_numpy().astype(np.int64)  # (R,)
    kinds = np.asarray(frame.column("kind").to_pylist(), dtype=object)  # (R,)
    covered = np.isin(kinds, COVERED_KINDS)  # (R,)
    report: dict[str, Any] = {
        "present": True, "path": str(path), "rows": int(student_ids.size),
        "kinds": {kind: int(n) for kind, n in zip(*np.unique(kinds, return_counts=True))} if kinds.size else {},
        "covered_tokens": int(covered.sum()), "token_share": _share(int(covered.sum()), int(student_ids.size)),
    }
    numeral = None
    if tables:
        token_bytes = tables["student"].token_bytes
        numeral = np.fromiter((is_numeral(token_bytes[i]) for i in student_ids.tolist()), dtype=bool,
                              count=student_ids.size)  # (R,)
        report |= {"numeral_source": "projection table + student tokenizer", "numeral_tokens": int(numeral.sum()),
                   "covered_numeral_tokens": int((covered & numeral).sum()),
                   "numeral_share": _share(int((covered & numeral).sum()), int(numeral.sum())),
                   "numeral_matched_share": _share(int((numeral & (kinds == "matched")).sum()), int(numeral.sum()))}
    else:
        recorded = (manifest["stats"].get("projection") or {}).get("coverage") or {}
        report |= {"numeral_source": "manifest (student tokenizer not loaded)",
                   "numeral_share": recorded.get("numeral_tokens"),
                   "numeral_matched_share": recorded.get("numeral_tokens_matched")}
    if student_id_counts is not None:
        inside = student_ids < student_id_counts.size
        counts = np.zeros(student_ids.size, dtype=np.int64)  # (R,) occurrences of each row's id
        counts[inside] = student_id_counts[student_ids[inside]]
        text_tokens = int(counts.sum())  # completion tokens with bytes (special tokens have no row)
        occurrence = {"completion_tokens_with_bytes": text_tokens,
                      "token_share": _share(int(counts[covered].sum()), text_tokens)}
        if numeral is not None:
            occurrence |= {"numeral_tokens": int(counts[numeral].sum()),
                           "numeral_share": _share(int(counts[covered & numeral].sum()), int(counts[numeral].sum()))}
        report["by_occurrence"] = occurrence
    return report


def inspect_aligned(out_dir: str | Path, manifest: dict[str, Any], *, top: int = 15, sample_rows: int = 5000,
                    load_tokenizers: bool = True) -> dict[str, Any]:
    columns = ["num_groups", "status", "truncated", "teacher_topk_ids"] + [
        f"{side}_{name}" for side in SIDES for name in ("prompt_ids", "completion_ids", "group_ids")]
    totals: dict[str, Any] = {side: Counter() for side in SIDES}
    statuses: Counter = Counter()
    rows = groups = truncated = topk_rows = 0
    topk_k: set[int] = set()
    group_counter: Counter = Counter()
    size_counts: dict[str, list[int]] = {side: [] for side in SIDES}
    sampled = 0
    student_vocab = manifest["fingerprints"].get("student_tokenizer", {}).get("vocab_size")
    student_id_counts = np.zeros(int(student_vocab), dtype=np.int64) if student_vocab else None  # (Vs,)
    for batch in iter_shard_batches(out_dir, manifest, columns=columns, batch_size=4096):
        num_groups = batch.column("num_groups").to_numpy().astype(np.int64)
        rows += batch.num_rows
        groups += int(num_groups.sum())
        statuses.update(batch.column("status").to_pylist())
        truncated += int(np.sum(batch.column("truncated").to_numpy(zero_copy_only=False)))
        topk = batch.column("teacher_topk_ids")
        topk_rows += batch.num_rows - topk.null_count
        if batch.num_rows - topk.null_count:
            topk_k.update(set(topk.flatten().value_lengths().to_numpy().tolist()))
        per_side = {}
        for side in SIDES:
            group_ids, lengths = _flat(batch.column(f"{side}_group_ids"))
            ids, _ = _flat(batch.column(f"{side}_completion_ids"))
            _, prompt_lengths = _flat(batch.column(f"{side}_prompt_ids"))
            global_ids = _global_groups(group_ids, lengths, num_groups)  # (N,)
            sizes = sizes_per_group(group_ids, lengths, num_groups)  # (G,)
            size_counts[side] = _add_counts(size_counts[side], group_size_counts(sizes))
            totals[side].update({
                "prompt_tokens": int(prompt_lengths.sum()),
                "completion_tokens": int(lengths.sum()),
                "grouped_tokens": int(sizes.sum()),
                "ungrouped_tokens": int((global_ids < 0).sum()),
                "multi_token_groups": int((sizes > 1).sum()),
            })
            per_side[side] = (ids, global_ids, sizes)
            if side == "student" and student_id_counts is not None and ids.size:
                found = np.bincount(ids.astype(np.int64), minlength=student_id_counts.size)
                if found.size > student_id_counts.size:  # ids beyond the recorded vocabulary: not weighed
                    student_id_counts = None
                else:
                    student_id_counts += found
        if sampled < sample_rows:
            take_groups = int(num_groups[: sample_rows - sampled].sum())
            sampled += min(batch.num_rows, sample_rows - sampled)
            multi = (per_side["student"][2] > 1) | (per_side["teacher"][2] > 1)  # (G,)
            multi[take_groups:] = False
            keys: dict[str, list[tuple[int, ...]]] = {}
            for side in SIDES:
                ids, global_ids, _ = per_side[side]
                keep = global_ids >= 0
                keep[keep] = multi[global_ids[keep]]
                order = global_ids[keep]
                starts = np.flatnonzero(np.diff(np.concatenate([[-1], order])))
                keys[side] = [tuple(chunk.tolist()) for chunk in np.split(ids[keep], starts[1:])] if len(order) else []
            group_counter.update(zip(keys["student"], keys["teacher"]))

    report: dict[str, Any] = {
        "path": str(out_dir), "kind": "aligned", "rows": rows, "shards": manifest["num_shards"], "groups": groups,
        "rows_by_status": dict(statuses), "rows_with_mismatch": sum(v for k, v in statuses.items() if k != "ok"),
        "truncated_rows": truncated, "rows_with_teacher_topk": topk_rows, "teacher_topk_k": sorted(topk_k),
        "invalid_rows": manifest["stats"].get("invalid", {}), "skipped_rows": manifest["stats"].get("skipped", {}),
    }
    for side in SIDES:
        part = dict(totals[side])
        part["multi_token_group_share"] = part.get("multi_token_groups", 0) / max(groups, 1)
        part["tokens_per_group"] = part.get("grouped_tokens", 0) / max(groups, 1)
        part["group_size_counts"] = size_counts[side]  # [i] = groups of i + 1 tokens on this side
        part["excluded_tokens"] = int(manifest["stats"].get(side, {}).get("excluded_tokens", 0))
        record = manifest["fingerprints"].get(f"{side}_tokenizer", {})
        part["tokenizer"] = record.get("name")
        part["vocab_size"] = record.get("vocab_size")
        report[side] = part
    vocab_file = Path(out_dir) / manifest["files"].get("vocab_map", "vocab_map/vocab_map.parquet")
    pairs = pq.ParquetFile(vocab_file).metadata.num_rows if vocab_file.exists() else None
    report["vocab_map"] = {
        "pairs": pairs,
        "student_share": pairs / report["student"]["vocab_size"] if pairs and report["student"]["vocab_size"] else None,
        "teacher_share": pairs / report["teacher"]["vocab_size"] if pairs and report["teacher"]["vocab_size"] else None,
    }
    tables, note = _load_tables(manifest) if load_tokenizers else ({}, "tokenizers not loaded (--no-tokenizers)")
    top_groups = []
    for (student_ids, teacher_ids), count in group_counter.most_common(top):
        entry: dict[str, Any] = {"count": count, "student_ids": list(student_ids), "teacher_ids": list(teacher_ids)}
        if tables:
            student_bytes = [tables["student"].token_bytes[i] for i in student_ids]
            teacher_bytes = [tables["teacher"].token_bytes[i] for i in teacher_ids]
            pieces = group_pieces(student_bytes, teacher_bytes, tables)
            if pieces is None:
                note = "tokenizers loaded from the manifest's names do not reproduce the stored groups"
            else:
                student_bytes, teacher_bytes = pieces
            entry["text"] = b"".join(student_bytes).decode("utf-8", errors="backslashreplace")
            entry["student_pieces"] = [_piece(b) for b in student_bytes]
            entry["teacher_pieces"] = [_piece(b) for b in teacher_bytes]
        top_groups.append(entry)
    report["top_multi_token_groups"] = top_groups
    report["top_groups_from_rows"] = min(sampled, rows)
    report["projection"] = projection_coverage(out_dir, manifest, tables, student_id_counts)
    report["notes"] = [note] if note else []
    return report


def inspect_teacher(out_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    rows = tokens = 0
    ks: set[int] = set()
    finish: Counter = Counter()
    for batch in iter_shard_batches(out_dir, manifest, columns=["teacher_completion_ids", "teacher_topk_ids",
                                                                 "finish_reason"]):
        rows += batch.num_rows
        tokens += int(_total_length(batch.column("teacher_completion_ids")))
        topk = batch.column("teacher_topk_ids")
        if batch.num_rows - topk.null_count:
            ks.update(set(topk.flatten().value_lengths().to_numpy().tolist()))
        finish.update(batch.column("finish_reason").to_pylist())
    total_bytes = sum(shard["bytes"] for shard in manifest["shards"])
    return {"path": str(out_dir), "kind": "teacher", "rows": rows, "shards": manifest["num_shards"],
            "teacher_tokens": tokens, "topk_k": sorted(ks), "finish_reasons": dict(finish),
            "bytes": total_bytes, "bytes_per_teacher_token": total_bytes / max(tokens, 1),
            "teacher_tokenizer": manifest["fingerprints"].get("teacher_tokenizer", {}).get("name"), "notes": []}


def _total_length(column: pa.Array) -> int:
    """Sum of the list lengths of a list column."""
    return int(np.sum(column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)))


def inspect_output(out_dir: str | Path, *, top: int = 15, sample_rows: int = 5000,
                   load_tokenizers: bool = True) -> dict[str, Any]:
    """Report (a JSON-able dict) on an aligned or teacher-cache output folder."""
    manifest = read_manifest(out_dir)
    verify_shards(out_dir, manifest)
    if manifest["kind"] == "teacher":
        return inspect_teacher(out_dir, manifest)
    if manifest["kind"] != "aligned":
        raise GoldInputError(f"{out_dir} holds {manifest['kind']!r} output, which gold inspect does not describe.")
    return inspect_aligned(out_dir, manifest, top=top, sample_rows=sample_rows, load_tokenizers=load_tokenizers)


def render_report(report: dict[str, Any]) -> str:
    """Human-readable text of an inspect report."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buffer = StringIO()
    console = Console(file=buffer, width=120, force_terminal=False, color_system=None)
    if report["kind"] == "teacher":
        console.print(f"{report['path']}: teacher cache, {report['rows']} rows in {report['shards']} shards, "
                      f"{report['teacher_tokens']} teacher tokens, top-k K={report['topk_k']}, "
                      f"{report['bytes_per_teacher_token']:.1f} bytes/token, finish {report['finish_reasons']}")
        return buffer.getvalue()
    console.print(f"{report['path']}: {report['rows']} rows in {report['shards']} shards, {report['groups']} groups")
    table = Table("", "student", "teacher", title="tokens per side")
    s, t = report["student"], report["teacher"]
    for label, key, fmt in (("tokenizer", "tokenizer", "{}"), ("vocabulary", "vocab_size", "{}"),
                            ("prompt tokens", "prompt_tokens", "{}"), ("completion tokens", "completion_tokens", "{}"),
                            ("grouped tokens", "grouped_tokens", "{}"),
                            ("excluded tokens (not special)", "excluded_tokens", "{}"),
                            ("tokens per group", "tokens_per_group", "{:.3f}"),
                            ("multi-token groups", "multi_token_groups", "{}"),
                            ("share of multi-token groups", "multi_token_group_share", "{:.2%}")):
        table.add_row(label, fmt.format(s.get(key, 0)), fmt.format(t.get(key, 0)))
    console.print(table)
    vocab = report["vocab_map"]
    share = (f" ({vocab['student_share']:.1%} of student, {vocab['teacher_share']:.1%} of teacher vocabulary)"
             if vocab["pairs"] else "")
    console.print(f"vocab map: {vocab['pairs']} byte-identical pairs{share}")
    console.print(f"rows by status: {report['rows_by_status']} (with mismatch: {report['rows_with_mismatch']}); "
                  f"truncated: {report['truncated_rows']}; invalid skipped: {report['invalid_rows'] or 0}; "
                  f"too long skipped: {report['skipped_rows'] or 0}")
    if report["rows_with_teacher_topk"]:
        console.print(f"teacher top-k: {report['rows_with_teacher_topk']} rows, K={report['teacher_topk_k']}")
    console.print(render_projection(report["projection"]), soft_wrap=True)
    groups = Table("count", "text", "student pieces", "teacher pieces",
                   title=f"most frequent multi-token groups (first {report['top_groups_from_rows']} rows)")
    for entry in report["top_multi_token_groups"]:
        groups.add_row(str(entry["count"]), repr(entry.get("text", "?")),
                       " ".join(entry.get("student_pieces", map(str, entry["student_ids"]))),
                       " ".join(entry.get("teacher_pieces", map(str, entry["teacher_ids"]))))
    console.print(groups)
    for note in report["notes"]:
        console.print(f"note: {note}")
    return buffer.getvalue()


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.2%}"


def render_projection(projection: dict[str, Any]) -> str:
    """One or two lines on the projection coverage of an inspect report."""
    if not projection["present"]:
        return f"projection: {projection['note']}"
    kinds = ", ".join(f"{kind} {n}" for kind, n in projection["kinds"].items())
    line = (f"projection ({kinds}): matched ∪ projected cover {_pct(projection['token_share'])} of student tokens, "
            f"{_pct(projection['numeral_share'])} of numeral tokens (matched alone "
            f"{_pct(projection['numeral_matched_share'])}; numerals from the {projection['numeral_source']})")
    occurrence = projection.get("by_occurrence")
    if occurrence:
        line += (f"\nprojection by occurrence in the stored student completions: {_pct(occurrence['token_share'])} of "
                 f"{occurrence['completion_tokens_with_bytes']} text tokens")
        if "numeral_share" in occurrence:
            line += f", {_pct(occurrence['numeral_share'])} of {occurrence['numeral_tokens']} numeral tokens"
    return line


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2)
