"""Greedy exact-match accuracy of packaged models on the verifiable tasks, with 95 % Wilson intervals.

The starting line of the quality protocol: how often the teacher is right, and how often each student is right
before any training (the gap distillation can close).

    python bench/task_accuracy.py                                   # teacher + both students, 24 prompts/task
    python bench/task_accuracy.py --models pkg:smollm2-135m-instruct --tasks arith --count 8   # a smoke run
    python bench/task_accuracy.py --prompts my_heldout.jsonl        # any {"messages", "answer", "task"} file

Held-out prompts are make_rows(task, count, seed=1) of gold_pipeline.recipes.tasks (the train prompts of the
protocol use seed 0 and are excluded). The last output line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gold_pipeline.data.sources import iter_records
from gold_pipeline.models.generation import SamplingSettings, generate_seeded
from gold_pipeline.models.loading import load_model, model_tokenizer_name
from gold_pipeline.recipes.tasks import TASKS, make_rows, row_question, score_row, wilson_interval
from gold_pipeline.text.encode import render_prompt_ids
from gold_pipeline.text.pair import TokenizerSide
from gold_pipeline.text.tokenizers import load_tokenizer

MODELS = ("pkg:qwen2.5-coder-0.5b-instruct", "pkg:smollm2-135m-instruct", "pkg:gemma3-270m")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--count", type=int, default=24, help="held-out prompts per task")
    p.add_argument("--prompts", default=None, help="a prompt file instead of the generated held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def heldout_rows(args) -> list[dict]:
    if args.prompts:
        rows = [record for _, record, _ in iter_records(args.prompts)]
        bad = [i for i, row in enumerate(rows) if not isinstance(row, dict) or "answer" not in row]
        if bad:
            raise SystemExit(f"{args.prompts}: row {bad[0]} is not a JSON object with \"messages\" and \"answer\".")
        return rows
    rows = []
    for task in args.tasks.split(","):
        train = {row_question(r) for r in make_rows(task, 256, seed=0)}
        rows += make_rows(task, args.count, seed=1, exclude=train)
    return rows


def evaluate(name: str, rows: list[dict], args) -> dict:
    """Greedy completions of every row by model `name`: per-task accuracy, interval, tokens/s, examples."""
    started = time.perf_counter()
    model = load_model(name)
    tok = load_tokenizer(model_tokenizer_name(name))
    side = TokenizerSide.of(tok)
    load_s = time.perf_counter() - started
    prompts = [render_prompt_ids(tok, row["messages"]) for row in rows]
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=args.batch_size)
    started = time.perf_counter()
    with torch.inference_mode():
        completions, _ = generate_seeded(model, prompts, [0] * len(prompts), sampling, stop_ids=list(side.stop_ids),
                                         pad_id=side.pad_id)  # fmt: skip
    seconds = time.perf_counter() - started
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in completions]
    per_task: dict[str, dict] = {}
    for row, text in zip(rows, texts):
        entry = per_task.setdefault(row.get("task", "arith"), {"correct": 0, "total": 0, "example": None})
        ok = score_row(row, text)
        entry["correct"] += ok
        entry["total"] += 1
        if entry["example"] is None:
            entry["example"] = {"question": row_question(row), "answer": row["answer"], "completion": text[:300],
                                "correct": ok}
    for entry in per_task.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
        entry["interval95"] = [round(x, 3) for x in wilson_interval(entry["correct"], entry["total"])]
    tokens = sum(map(len, completions))
    return {"load_s": round(load_s, 1), "generate_s": round(seconds, 1), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "tasks": per_task}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = heldout_rows(args)
    results = {}
    for name in args.models.split(","):
        result = evaluate(name, rows, args)
        results[name] = result
        for task, entry in result["tasks"].items():
            low, high = entry["interval95"]
            print(f"{name:36s} {task:10s} {entry['correct']:3d}/{entry['total']:<3d} = {entry['accuracy']:.3f} "
                  f"[{low:.3f}, {high:.3f}]  ({result['tokens_per_s']} tok/s)", flush=True)
    print(json.dumps({"rows": len(rows), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                      "results": results}))


if __name__ == "__main__":
    main()
