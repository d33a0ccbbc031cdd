"""Time of the projection loss against the hybrid loss on the same inputs (issue 14 target: within 1.3x).

    .venv/bin/python bench/projection.py [--lengths 256] [--repeats 5] [--teacher pkg:qwen]

Inputs as bench/loss.py, but the text is the packaged demo data's user/assistant turns (math word problems and arithmetic:
many multi-digit numbers; no extra package needed), tokenized with the
packaged cl100k student (up to three digits per token) and a teacher (default Qwen: one digit per token), cut at a
shared byte boundary within the first L student tokens, aligned by gold_pipeline.align.groups; model-like synthetic
logits. Each step: first-position merge of both sides, the loss, backward to the student logits. Best of
``--repeats`` after a warm-up, both losses alternating in one process (2 threads). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loss import _align, _model_like_logits  # noqa: E402  (bench/loss.py helpers)


def _demo_text() -> str:
    """The packaged demo conversations' user and assistant turns (word problems, arithmetic: many numbers)."""
    from gold_pipeline.recipes import demo

    folder = Path(demo.__file__).parent / "demo_data"
    parts = []
    for name in ("train.jsonl", "arith_train.jsonl"):
        for line in (folder / name).read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            parts.extend(m["content"] for m in row.get("messages", []) if m["role"] != "system")
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher", default="pkg:qwen")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from gold_pipeline.losses import hybrid_loss, merged_logprobs_from_logits, vocab_split
    from gold_pipeline.losses.projection import projection_columns, projection_loss, teacher_path_from_logits
    from gold_pipeline.text.bytes import byte_table
    from gold_pipeline.text.encode import encode_completion
    from gold_pipeline.text.projection import cached_projection
    from gold_pipeline.text.tokenizers import load_tokenizer
    from gold_pipeline.text.vocab_map import cached_vocab_map

    student, teacher = load_tokenizer("pkg:cl100k"), load_tokenizer(args.teacher)
    s_table, t_table = byte_table(student), byte_table(teacher)
    vs, vt = s_table.vocab_size, t_table.vocab_size
    split = vocab_split(cached_vocab_map(s_table, t_table), vs, vt)
    columns = projection_columns(cached_projection(s_table, t_table, teacher), vs, vt)
    text = _demo_text()
    s_all = np.asarray(encode_completion(student, text), dtype=np.int64)
    t_all = np.asarray(encode_completion(teacher, text), dtype=np.int64)
    out = {"teacher": args.teacher, "student": "pkg:cl100k", "load_avg": os.getloadavg()[0], "lengths": {}}
    for length in [int(x) for x in args.lengths.split(",")]:
        case = _align(s_all, t_all, s_table, t_table, length)
        s_ids = torch.as_tensor(case["student_ids"])
        t_ids = torch.as_tensor(case["teacher_ids"])
        s_gid = torch.as_tensor(case["student_group_ids"])
        t_gid = torch.as_tensor(case["teacher_group_ids"])
        groups = int(s_gid.max()) + 1
        s_logits = _model_like_logits(len(s_ids), vs, case["student_ids"], seed=1).requires_grad_()
        t_logits = _model_like_logits(len(t_ids), vt, case["teacher_ids"], seed=2)

        def step(kind: str) -> dict:
            s_logits.grad = None
            s_m = merged_logprobs_from_logits(s_logits, s_ids, s_gid, groups, "first")
            with torch.no_grad():
                t_m = merged_logprobs_from_logits(t_logits, t_ids, t_gid, groups, "first")
            if kind == "hybrid":
                loss, diag = hybrid_loss(s_m, t_m, split, beta=0.5)
            else:
                path = teacher_path_from_logits(t_logits, t_ids, t_gid, groups, columns.depth, merged=t_m)
                loss, diag = projection_loss(s_m, t_m, path, split, columns, beta=0.5)
            loss.backward()
            return diag

        times: dict[str, list[float]] = {"hybrid": [], "projection": []}
        diag = {}
        for kind in times:
            step(kind)  # warm-up
        for _ in range(args.repeats):
            for kind in times:
                t0 = time.perf_counter()
                d = step(kind)
                times[kind].append(time.perf_counter() - t0)
                if kind == "projection":
                    diag = d
        best = {k: min(v) for k, v in times.items()}
        out["lengths"][str(length)] = {
            "student_tokens": len(s_ids), "teacher_tokens": len(t_ids), "groups": groups,
            "hybrid_s": round(best["hybrid"], 4), "projection_s": round(best["projection"], 4),
            "ratio": round(best["projection"] / best["hybrid"], 3),
            "projected_pairs_per_group": round(diag["projected_pairs"], 3),
            "teacher_mass_projected_per_group": round(diag["teacher_mass_projected"], 4)}
        print(f"L={length}: hybrid {best['hybrid']:.4f}s projection {best['projection']:.4f}s "
              f"ratio {best['projection'] / best['hybrid']:.3f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
