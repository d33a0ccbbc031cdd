"""Distillation quality at equal budget: seq_kd vs ULD vs GOLD hybrid off-policy vs GOLD hybrid on-policy.

One teacher cache (teacher completions + top-K log-probs of the train and held-out prompts) is made once and
shared by every run; each (method, seed) run starts from the same student initialisation for that seed, sees
the same rows in the same order for the same number of optimizer steps with the same optimizer settings. Only
the loss (and, for on-policy, who writes the completions) differs:

  seq_kd    cross-entropy on the cached teacher completions (sequence-level KD on the same data: no live
            teacher generations, so every method sees the same teacher text)
  uld       ULD (sorted L1 of the merged distributions) from the cached top-K, off-policy
  gold_off  GOLD hybrid (JSD on byte-identical vocabulary + ULD on the rest) from the cached top-K, off-policy
  gold_on   GOLD hybrid with on-policy share --lmbda: those slices are student samples scored by the live teacher

Metrics (held-out prompts never trained on):
  bpb        student bits per byte on the teacher's held-out completions (tokenizer independent)
  gap_closed (bpb_before - bpb_after) / (bpb_before - teacher_bpb)
  exact      exact match on generated multi-digit arithmetic (greedy student answer, last number vs the answer)

    python bench/quality.py --reuse runs/demo                 # the README table: the demo's data (~20 min)
    python bench/quality.py                                   # own teacher cache of the prompt files (+arithmetic)
    python bench/quality.py --steps 300 --seeds 0,1,2,3,4      # a bigger one
    python bench/quality.py --methods gold_off,uld --steps 20 --seeds 0   # a smoke run

The last output line is one JSON object with every figure (per-seed values, mean and std per method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATA = REPO / "gold_pipeline" / "recipes" / "demo_data"
METHODS = ("seq_kd", "uld", "gold_off", "gold_on")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="pkg:smollm2-135m-instruct")
    p.add_argument("--student-tokenizer", default="pkg:mistral-sp-v1")
    p.add_argument("--student-model", default=None, help="start every run from this checkpoint (default: a fresh "
                                                         "Llama-shaped model built from the size options)")
    p.add_argument("--student-hidden-size", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--student-heads", type=int, default=4)
    p.add_argument("--student-intermediate-size", type=int, default=768)
    p.add_argument("--train-prompts", default=f"{DATA / 'train.jsonl'},{DATA / 'arith_train.jsonl'}",
                   help="comma-separated prompt files the teacher answers for training")
    p.add_argument("--heldout-prompts", default=f"{DATA / 'heldout.jsonl'},{DATA / 'arith_heldout.jsonl'}",
                   help="comma-separated prompt files whose teacher completions measure bits per byte")
    p.add_argument("--em-prompts", default=str(DATA / "arith_heldout.jsonl"),
                   help="prompt file with an `answer` field per row for exact match (empty = skip)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lmbda", type=float, default=0.5, help="on-policy share of gold_on (GOLDConfig's default)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="teacher completion length")
    p.add_argument("--max-completion-length", type=int, default=96, help="student-side limit, every method")
    p.add_argument("--em-max-new-tokens", type=int, default=48)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--teacher-temperature", type=float, default=0.7)
    p.add_argument("--teacher-batch-size", type=int, default=16)
    p.add_argument("--cache-seed", type=int, default=0, help="seed of the teacher samples (one cache for all runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 2, or 1 when the load average exceeds the core count)")
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "quality")
    p.add_argument("--fresh-cache", action="store_true", help="redo the teacher cache even if it matches")
    p.add_argument("--reuse", type=Path, default=None,
                   help="a `gold demo` output folder: train/evaluate on its aligned_train/aligned_heldout instead of "
                        "caching --train-prompts/--heldout-prompts (teacher exact match is then not measured)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods {unknown} unknown; choose from {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: one teacher cache + alignment per prompt set, reused when the settings match.
# ----------------------------------------------------------------------------------------------------------


def concat_prompts(files: str, target: Path) -> Path:
    """Several prompt jsonl files -> one (the teacher cache reads one dataset)."""
    lines = []
    for name in files.split(","):
        path = Path(name.strip())
        if not path.is_file():
            raise SystemExit(f"prompt file {path} does not exist; pass existing jsonl files (see bench/make_arith.py).")
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def prepared_set(args, name: str, files: str, teacher_model) -> tuple[Path, dict]:
    """(aligned dir, cache summary) of one prompt set; the cache is reused when its settings match."""
    from gold_pipeline.recipes.demo import align_cache, cache_teacher

    base = args.work / name
    prompts = concat_prompts(files, base / "prompts.jsonl")
    key = {"teacher": args.teacher, "student_tokenizer": args.student_tokenizer, "prompts": prompts.read_text(),
           "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "temperature": args.teacher_temperature,
           "seed": args.cache_seed}
    key_file = base / "cache_key.json"
    cache_dir, aligned_dir = base / "teacher", base / "aligned"
    if (not args.fresh_cache and key_file.exists() and json.loads(key_file.read_text()) == key
            and (aligned_dir / "manifest.json").exists()):
        return aligned_dir, json.loads((base / "cache_summary.json").read_text())
    key_file.unlink(missing_ok=True)
    summary = cache_teacher(teacher=args.teacher, model=teacher_model(), dataset=str(prompts), out=cache_dir,
                            max_examples=None, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                            temperature=args.teacher_temperature, top_p=0.95, batch_size=args.teacher_batch_size,
                            seed=args.cache_seed, overwrite=True)
    align_cache(student_tokenizer=args.student_tokenizer, teacher_cache=cache_dir, out=aligned_dir, overwrite=True)
    summary = {k: summary[k] for k in ("rows", "teacher_tokens", "seconds")}
    (base / "cache_summary.json").write_text(json.dumps(summary))
    key_file.write_text(json.dumps(key))
    return aligned_dir, summary


def read_em_rows(path: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if "answer" not in row or "messages" not in row:
            raise SystemExit(f"{path} row {i}: exact-match rows need `messages` and `answer` (bench/make_arith.py).")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------------------


def final_number(text: str) -> str | None:
    """The last number in a completion, commas removed ("Answer: 1,234." -> "1234")."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def is_correct(text: str, answer: str) -> bool:
    number = final_number(text)
    if number is None:
        return False
    try:
        return float(number) == float(answer)
    except ValueError:
        return False


def exact_match(model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int = 8) -> float:
    """Share of rows whose greedy completion ends with the right number."""
    from gold_pipeline.models.generation import SamplingSettings, generate_seeded
    from gold_pipeline.text.encode import render_prompt_ids
    from gold_pipeline.text.pair import pad_token_id, stop_token_ids

    stop = stop_token_ids(tokenizer)
    prompts = [render_prompt_ids(tokenizer, [m for m in r["messages"] if m["role"] != "assistant"]) for r in rows]
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    completions, _ = generate_seeded(model, prompts, [0] * len(prompts), greedy, stop_ids=stop,
                                     pad_id=pad_token_id(tokenizer))
    correct = 0
    for row, ids in zip(rows, completions):
        text = tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)
        correct += is_correct(text, row["answer"])
    return correct / max(len(rows), 1)


def teacher_exact_match(aligned_dir: Path, pair, em_rows: list[dict]) -> float | None:
    """Exact match of the teacher's own cached (sampled) completions on the exact-match prompts."""
    from gold_pipeline.data.shards import sample_id
    from gold_pipeline.recipes.demo import aligned_rows

    answers = {sample_id([m for m in r["messages"] if m["role"] != "assistant"]): r["answer"] for r in em_rows}
    hits = [is_correct(row["completion_text"], answers[row["sample_id"]])
            for row in aligned_rows(aligned_dir, pair, max_completion_length=10**6) if row["sample_id"] in answers]
    return sum(hits) / len(hits) if hits else None


def method_overrides(method: str, lmbda: float) -> dict:
    """GOLDConfig fields that make each method (everything else is shared)."""
    if method == "seq_kd":  # CE on the teacher's completion text; the distillation term is off
        return dict(lmbda=0.0, uld_use_hybrid_loss=False, uld_distillation_weight=0.0, uld_crossentropy_weight=1.0)
    if method == "uld":
        return dict(lmbda=0.0, uld_use_hybrid_loss=False)
    if method == "gold_off":
        return dict(lmbda=0.0, uld_use_hybrid_loss=True)
    return dict(lmbda=lmbda, uld_use_hybrid_loss=True)


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    import torch

    from gold_pipeline.data.shards import read_manifest
    from gold_pipeline.models.loading import load_model, model_tokenizer_name
    from gold_pipeline.recipes.demo import (
        aligned_rows,
        build_student,
        gap_closed,
        student_bits_per_byte,
        teacher_bits_per_byte,
        train_args,
        train_student,
    )
    from gold_pipeline.text.pair import TokenizerPair
    from gold_pipeline.text.tokenizers import load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads or (1 if os.getloadavg()[0] > (os.cpu_count() or 1) else 2))
    started = time.perf_counter()
    teacher_holder: dict = {}

    def teacher_model():
        if "model" not in teacher_holder:
            teacher_holder["model"] = load_model(args.teacher)
        return teacher_holder["model"]

    student_tok = load_tokenizer(args.student_tokenizer)
    pair = TokenizerPair.build(student_tok, load_tokenizer(model_tokenizer_name(args.teacher)))
    if args.reuse is not None:
        train_dir, heldout_dir = args.reuse / "aligned_train", args.reuse / "aligned_heldout"
        train_cache, heldout_cache = ({"rows": read_manifest(d, kind="aligned")["stats"]["rows"]}
                                      for d in (train_dir, heldout_dir))
    else:
        train_dir, train_cache = prepared_set(args, "train", args.train_prompts, teacher_model)
        heldout_dir, heldout_cache = prepared_set(args, "heldout", args.heldout_prompts, teacher_model)
    cache_seconds = time.perf_counter() - started
    heldout = aligned_rows(heldout_dir, pair, max_completion_length=args.max_completion_length)
    teacher_bpb = teacher_bits_per_byte(heldout, pair)["bits_per_byte"]
    em_rows = read_em_rows(args.em_prompts) if args.em_prompts else []
    teacher_em = teacher_exact_match(heldout_dir, pair, em_rows) if em_rows and args.reuse is None else None
    print(f"[quality] data ready in {cache_seconds:.0f}s: {train_cache['rows']} train / {heldout_cache['rows']} "
          f"held-out teacher completions; teacher bpb {teacher_bpb:.4f}, teacher exact match {teacher_em}",
          flush=True)

    def fresh_student(seed: int):
        if args.student_model:
            return load_model(args.student_model)
        return build_student(student_tok, hidden_size=args.student_hidden_size, layers=args.student_layers,
                             heads=args.student_heads, intermediate_size=args.student_intermediate_size, seed=seed)

    runs: list[dict] = []
    before_by_seed: dict[int, dict] = {}
    for seed in args.seeds:
        student = fresh_student(seed)
        before_by_seed[seed] = {
            "bpb": student_bits_per_byte(student, heldout, pair)["bits_per_byte"],
            "exact": exact_match(student, student_tok, em_rows, max_new_tokens=args.em_max_new_tokens)
            if em_rows else None,
        }
        for method in args.methods:
            student = fresh_student(seed)
            run_started = time.perf_counter()
            targs = train_args(args.work / "runs" / f"{method}-seed{seed}", steps=args.steps,
                               batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed,
                               max_completion_length=args.max_completion_length,
                               warmup_steps=max(1, args.steps // 20), **method_overrides(method, args.lmbda))
            trained = train_student(student, args=targs, train_dir=train_dir, pair=pair,
                                    teacher_model=teacher_model() if targs.lmbda > 0 else None)
            bpb = student_bits_per_byte(student, heldout, pair)["bits_per_byte"]
            em = exact_match(student, student_tok, em_rows, max_new_tokens=args.em_max_new_tokens) if em_rows else None
            run = {"method": method, "seed": seed, "bpb_before": before_by_seed[seed]["bpb"], "bpb": bpb,
                   "gap_closed": gap_closed(before_by_seed[seed]["bpb"], bpb, teacher_bpb), "exact": em,
                   "train_seconds": trained["seconds"], "seconds": round(time.perf_counter() - run_started, 1)}
            runs.append(run)
            print(f"[quality] {method:8s} seed {seed}: bpb {run['bpb_before']:.4f} -> {bpb:.4f} "
                  f"(gap closed {run['gap_closed']:.3f}), exact {em}, {run['seconds']:.0f}s", flush=True)

    summary = {}
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {k: mean_std([r[k] for r in mine]) for k in ("bpb", "gap_closed", "exact", "train_seconds")}
    print_table(summary, teacher_bpb, teacher_em, before_by_seed)
    result = {
        "bench": "quality", "teacher": args.teacher,
        "student": args.student_model or f"fresh Llama h{args.student_hidden_size} x{args.student_layers} "
                                          f"({args.student_tokenizer})",
        "threads": torch.get_num_threads(), "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "lmbda_on_policy": args.lmbda, "seeds": args.seeds, "data": str(args.reuse or "prompt files"),
        "train_rows": train_cache["rows"],
        "heldout_rows": heldout_cache["rows"], "em_rows": len(em_rows), "teacher_bpb": teacher_bpb,
        "teacher_exact_sampled": teacher_em,
        "student_before": {"bpb": mean_std([b["bpb"] for b in before_by_seed.values()]),
                           "exact": mean_std([b["exact"] for b in before_by_seed.values()])},
        "methods": summary, "runs": runs, "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return result


def _fmt(stat: dict, digits: int = 3, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def print_table(summary: dict, teacher_bpb: float, teacher_em, before_by_seed: dict) -> None:
    before = mean_std([b["bpb"] for b in before_by_seed.values()])
    print(f"\nteacher bpb {teacher_bpb:.3f}; untrained student bpb {_fmt(before)}; teacher exact match (its sampled "
          f"cached answers) {teacher_em if teacher_em is None else f'{100 * teacher_em:.1f}%'}")
    print(f"{'method':10s} {'held-out bpb':>16s} {'gap closed %':>16s} {'exact match %':>16s} {'train s':>10s}")
    for method, stats in summary.items():
        print(f"{method:10s} {_fmt(stats['bpb']):>16s} {_fmt(stats['gap_closed'], 1, 100):>16s} "
              f"{_fmt(stats['exact'], 1, 100):>16s} {_fmt(stats['train_seconds'], 0):>10s}")


if __name__ == "__main__":
    main()
