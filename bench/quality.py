"""Does it distill? A real Qwen2.5 teacher, pretrained students of other families, verifiable tasks, every method
from the same student checkpoint at equal optimizer steps.

Protocol (all on this machine, nothing tuned on held-out prompts):
  1. prompts: `--task` train rows make_rows(task, --train-count, seed=0) and held-out rows make_rows(task,
     --heldout-count, seed=1) excluding the train questions (or any `--train-prompts` / `--heldout-prompts` file
     of {"messages", "answer", "task"} rows);
  2. teacher cache (pkg:qwen2.5-coder-0.5b-instruct, hf backend, top-K log-probs): the train prompts sampled at
     --teacher-temperature, the held-out prompts greedy (the teacher's held-out accuracy, and the held-out text
     that bits per byte is measured on);
  3. variants of the train data: "all" teacher completions, and "verified" (only the completions the task scorer
     accepts, scored again by the teacher with --score-only: the GOLD blog's verified_* sets); the no-teacher
     control trains on "Answer: <reference>" completions;
  4. per student, `gold align` of every cache; every (method, variant, seed) run starts from the same pretrained
     student weights and sees the same rows in the same order (data_seed = seed), for --steps optimizer steps of
     --batch-size rows, AdamW at --learning-rate (cosine, 1 warm-up step), full fine-tuning:

       sft       no teacher: cross-entropy on the reference answers ("Answer: 85")
       seq_kd    cross-entropy on the cached teacher completions
       uld       ULD (sorted L1 of the merged distributions) from the cached top-K
       gold_off  GOLD hybrid (JSD on byte-identical tokens + ULD on the rest) from the cached top-K
       gold_on   GOLD hybrid, lmbda 0.5: half the batches are student samples scored by the live teacher
       gold_on1  GOLD hybrid, lmbda 1: every batch on-policy
       proj_off, proj_on  gold_off / gold_on plus the projection loss (uld_use_projection_loss: student tokens that
                 spell several teacher tokens compared by the chain rule; issue 14); not in the default set

  5. metrics on the held-out prompts: greedy exact-match accuracy with a 95 % Wilson interval (per run, and pooled
     over seeds), before training and at --curve-points points during it; the teacher's accuracy; share of the
     teacher-student accuracy gap closed; student bits per byte on the teacher's held-out completions; the
     teacher's negative log-likelihood per byte of the student's own greedy answers (what on-policy distillation
     optimizes); train wall time. Mean ± std over seeds. A PNG of held-out accuracy against steps per method.

    python bench/quality.py                                   # the default: the run in docs/benchmarks.md
                                                              # (about 60 min on 2 idle cores)
    python bench/quality.py --students pkg:smollm2-135m-instruct,pkg:gemma3-270m --seeds 0,1,2,3,4 --steps 200 \\
        --train-count 2048 --heldout-count 256                # the larger one (hours here: everything runs on
                                                              # the CPU; GPU placement is not wired in yet)
    python bench/quality.py --methods seq_kd,gold_off --validate-on-train 40 --sweep beta=0.0,0.5 --seeds 0
                                                              # a sweep, evaluated on train-stream rows only
    python bench/quality.py --methods seq_kd,gold_off --seeds 0 --steps 2 --train-count 8 --heldout-count 8 \\
        --curve-points 1                                      # a smoke run

The last output line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sft", "seq_kd", "uld", "gold_off", "gold_on", "gold_on1", "proj_off", "proj_on")
DEFAULT_METHODS = METHODS[:6]
TEACHER_METHODS = METHODS[1:]
DISTILLATION_METHODS = METHODS[2:]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="pkg:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--students", default="pkg:smollm2-135m-instruct",
                   help="comma-separated pretrained students (pkg:gemma3-270m is the SentencePiece one)")
    p.add_argument("--task", default="arith2", help="arith2 | arith | gsm | countdown (ignored with prompt files)")
    p.add_argument("--train-count", type=int, default=96)
    p.add_argument("--heldout-count", type=int, default=40)
    p.add_argument("--train-prompts", default=None, help="a task-row file instead of the generated train prompts")
    p.add_argument("--heldout-prompts", default=None, help="a task-row file instead of the generated held-out ones")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--verified-methods", default="seq_kd,gold_off",
                   help="teacher methods also trained on the verified variant ('' = none, 'all' = every one)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--curve-points", type=int, default=2, help="held-out evaluations during training (the last "
                                                               "is the final one)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="teacher completion length")
    p.add_argument("--max-completion-length", type=int, default=48, help="student-side limit, every method")
    p.add_argument("--eval-max-new-tokens", type=int, default=48)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--teacher-temperature", type=float, default=0.7)
    p.add_argument("--teacher-batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "quality")
    p.add_argument("--fresh-cache", action="store_true", help="redo the teacher caches even if they match")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a GOLDConfig field for every teacher method (repeatable), e.g. --set beta=0.0: sweeps")
    p.add_argument("--validate-on-train", type=int, default=0, metavar="N",
                   help="evaluate on the next N rows of the train stream (make_rows seed 0 after the train rows, "
                        "minus any held-out question) instead of the held-out prompts: for sweeps, so that nothing "
                        "is tuned on held-out prompts")
    p.add_argument("--sweep", default="", metavar="FIELD=V1,V2,...",
                   help="train every distillation method (uld, gold_*) once per value of one GOLDConfig field (on top of --set), e.g. "
                        "--sweep beta=0.0,0.5,1.0; use with --validate-on-train")
    args = p.parse_args(argv)
    args.overrides = dict(parse_override(text, p) for text in args.overrides)
    field, _, values = args.sweep.partition("=")
    args.settings = [dict([parse_override(f"{field}={v.strip()}", p)]) for v in values.split(",") if v.strip()] or [{}]
    if args.validate_on_train and (args.train_prompts or args.heldout_prompts):
        p.error("--validate-on-train draws from the generated train stream: not with --train-prompts/--heldout-prompts")
    args.methods = _names(args.methods, METHODS, "--methods", p)
    args.verified_methods = (list(TEACHER_METHODS) if args.verified_methods.strip() == "all" else
                             _names(args.verified_methods, TEACHER_METHODS, "--verified-methods", p))
    args.students = [s.strip() for s in args.students.split(",") if s.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.curve_points < 1 or args.steps < args.curve_points:
        p.error("--curve-points must be between 1 and --steps")
    return args


def parse_override(text: str, parser) -> tuple[str, object]:
    """"beta=0.0" -> ("beta", 0.0): the value read as JSON (numbers, true/false, null), else kept as a string."""
    from gold_pipeline.training import GOLDConfig

    field, sep, value = text.partition("=")
    if not sep or field.strip() not in GOLDConfig.__dataclass_fields__:
        parser.error(f"--set {text!r}: expected FIELD=VALUE with a GOLDConfig field name")
    try:
        return field.strip(), json.loads(value)
    except json.JSONDecodeError:
        return field.strip(), value


def setting_label(setting: dict) -> str:
    """{"beta": 0.0} -> "beta=0.0" (run folder names and table rows of a --sweep)."""
    return ",".join(f"{k}={v}" for k, v in setting.items())


def _names(text: str, allowed: tuple[str, ...], flag: str, parser) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in allowed]
    if unknown:
        parser.error(f"{flag} {unknown} unknown; choose from {', '.join(allowed)}")
    return names


# ----------------------------------------------------------------------------------------------------------
# Data: prompt rows, teacher caches (reused when their key matches), variants.
# ----------------------------------------------------------------------------------------------------------


def prompt_rows(args) -> tuple[list[dict], list[dict]]:
    from gold_pipeline.recipes.tasks import make_rows, read_task_rows, row_question

    train = read_task_rows(args.train_prompts) if args.train_prompts else make_rows(args.task, args.train_count, 0)
    if args.heldout_prompts:
        heldout = read_task_rows(args.heldout_prompts)
    else:
        heldout = make_rows(args.task, args.heldout_count, 1, exclude={row_question(r) for r in train})
    if args.validate_on_train:  # the train stream continued; the held-out questions are never evaluated on
        held = {row_question(r) for r in heldout}
        stream = make_rows(args.task, args.train_count + args.validate_on_train + len(held), 0)[args.train_count:]
        heldout = [r for r in stream if row_question(r) not in held][: args.validate_on_train]
    overlap = {row_question(r) for r in train} & {row_question(r) for r in heldout}
    if overlap:
        raise SystemExit(f"{len(overlap)} held-out questions are also train questions (e.g. {sorted(overlap)[0]!r}): "
                         "the held-out file must be disjoint from the train file.")
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cached(args, name: str, rows: list[dict], teacher, *, temperature: float, score_only: bool = False) -> Path:
    """A teacher-cache folder of `rows` (generated, or scored with --score-only), reused when the key matches."""
    from gold_pipeline.recipes.demo import cache_teacher
    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    base = args.work / "caches" / name
    prompts = write_jsonl(base / "prompts.jsonl", rows)
    key = {"teacher": args.teacher, "prompts": prompts.read_text(encoding="utf-8"), "top_k": args.top_k,
           "max_new_tokens": args.max_new_tokens, "temperature": temperature, "score_only": score_only}
    key_file, out = base / "cache_key.json", base / "teacher"
    if not args.fresh_cache and key_file.exists() and json.loads(key_file.read_text()) == key \
            and (out / "manifest.json").exists():
        return out
    key_file.unlink(missing_ok=True)
    started = time.perf_counter()
    if score_only:
        cfg = TeacherCacheConfig(dataset=str(prompts), out=out, teacher=args.teacher, top_k=args.top_k,
                                 score_only=True, batch_size=args.teacher_batch_size, overwrite=True, progress=False,
                                 device="cpu")
        run_teacher_cache(cfg, model=teacher())
    else:
        cache_teacher(teacher=args.teacher, model=teacher(), dataset=str(prompts), out=out, max_examples=None,
                      top_k=args.top_k, max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=0.95,
                      batch_size=args.teacher_batch_size, seed=0, overwrite=True)
    print(f"[quality] teacher cache {name}: {len(rows)} rows in {time.perf_counter() - started:.0f}s", flush=True)
    key_file.write_text(json.dumps(key))
    return out


def cache_completions(cache_dir: Path) -> dict[str, str]:
    """sample_id -> the teacher's completion text of a teacher-cache folder."""
    import polars as pl

    frame = pl.read_parquet(str(cache_dir / "part-*.parquet"), columns=["sample_id", "completion_text"])
    return dict(zip(frame["sample_id"].to_list(), frame["completion_text"].to_list()))


def with_completion(row: dict, text: str) -> dict:
    prompt = [m for m in row["messages"] if m["role"] != "assistant"]
    return {**row, "messages": prompt + [{"role": "assistant", "content": text}]}


def prompt_id(row: dict) -> str:
    from gold_pipeline.data.shards import sample_id

    return sample_id([m for m in row["messages"] if m["role"] != "assistant"])


# ----------------------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------------------


def greedy_answers(model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """The model's greedy completion text of every row's prompt."""
    from gold_pipeline.models.generation import SamplingSettings, generate_seeded
    from gold_pipeline.text.encode import render_prompt_ids
    from gold_pipeline.text.pair import TokenizerSide

    side = TokenizerSide.of(tokenizer)
    prompts = [render_prompt_ids(tokenizer, [m for m in r["messages"] if m["role"] != "assistant"]) for r in rows]
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    completions, _ = generate_seeded(model, prompts, [0] * len(prompts), greedy, stop_ids=list(side.stop_ids),
                                     pad_id=side.pad_id)  # fmt: skip
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]


def accuracy(rows: list[dict], texts: list[str]) -> dict:
    from gold_pipeline.recipes.tasks import score_row, wilson_interval

    correct = sum(score_row(r, t) for r, t in zip(rows, texts))
    low, high = wilson_interval(correct, len(rows))
    return {"correct": correct, "total": len(rows), "accuracy": correct / max(len(rows), 1),
            "interval95": [round(low, 4), round(high, 4)]}


def teacher_nll_per_byte(teacher, teacher_tokenizer, rows: list[dict], texts: list[str], *, batch_size: int = 8):
    """The teacher's negative log-likelihood (nats) per UTF-8 byte of the given completions of the rows' prompts:
    sum over rows of -log p_teacher(completion tokens | prompt) / sum of completion bytes. Empty texts count 0/0."""
    import torch

    from gold_pipeline.text.encode import encode_completion, render_prompt_ids

    items = [(render_prompt_ids(teacher_tokenizer, [m for m in r["messages"] if m["role"] != "assistant"]),
              encode_completion(teacher_tokenizer, t), len(t.encode("utf-8"))) for r, t in zip(rows, texts) if t]
    nats = 0.0
    nbytes = sum(n for _, _, n in items)
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            width = max(len(p) + len(c) for p, c, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)                      # (B, T) right-padded
            mask = torch.zeros_like(ids)
            for i, (p, c, _) in enumerate(chunk):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                mask[i, : len(p) + len(c)] = 1
            logprobs = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for i, (p, c, _) in enumerate(chunk):
                positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)                    # predict c
                nats -= float(logprobs[i, positions, torch.tensor(c)].sum())
    return nats / max(nbytes, 1)


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def method_overrides(method: str) -> dict:
    """GOLDConfig fields that make each method (everything else is shared)."""
    if method in ("sft", "seq_kd"):  # cross-entropy only: the distillation term is off
        return dict(lmbda=0.0, uld_use_hybrid_loss=False, uld_distillation_weight=0.0, uld_crossentropy_weight=1.0)
    if method == "uld":
        return dict(lmbda=0.0, uld_use_hybrid_loss=False)
    if method.startswith("proj_"):  # the projection loss on top of the GOLD hybrid method of the same policy
        return method_overrides(method.replace("proj_", "gold_")) | dict(uld_use_projection_loss=True)
    return dict(lmbda={"gold_off": 0.0, "gold_on": 0.5, "gold_on1": 1.0}[method], uld_use_hybrid_loss=True)


# ----------------------------------------------------------------------------------------------------------
# One student: align, measure before, train every method.
# ----------------------------------------------------------------------------------------------------------


def run_student(args, student_name: str, caches: dict[str, Path], heldout: list[dict], teacher, teacher_tok,
                teacher_acc: float) -> dict:
    import torch
    from transformers import TrainerCallback

    from gold_pipeline.models.loading import load_model, model_tokenizer_name
    from gold_pipeline.recipes.demo import (
        align_cache,
        aligned_rows,
        student_bits_per_byte,
        teacher_bits_per_byte,
        train_args,
        train_student,
    )
    from gold_pipeline.text.pair import TokenizerPair
    from gold_pipeline.text.tokenizers import load_tokenizer

    tag = student_name.replace("pkg:", "").replace("/", "_")
    student_tok = load_tokenizer(model_tokenizer_name(student_name))
    pair = TokenizerPair.build(student_tok, teacher_tok)
    aligned = {}
    for name, cache_dir in caches.items():
        aligned[name] = args.work / tag / f"aligned_{name}"
        align_cache(student_tokenizer=model_tokenizer_name(student_name), teacher_cache=cache_dir, out=aligned[name],
                    overwrite=True)
    held_rows = aligned_rows(aligned["heldout"], pair, max_completion_length=args.max_completion_length)
    teacher_bpb = teacher_bits_per_byte(held_rows, pair)["bits_per_byte"]
    base = load_model(student_name)

    def evaluate(model) -> dict:
        texts = greedy_answers(model, student_tok, heldout, max_new_tokens=args.eval_max_new_tokens,
                               batch_size=args.eval_batch_size)
        return {**accuracy(heldout, texts), "texts": texts}

    started = time.perf_counter()
    before_eval = evaluate(base)
    before = {"accuracy": before_eval["accuracy"], "interval95": before_eval["interval95"],
              "bpb": student_bits_per_byte(base, held_rows, pair)["bits_per_byte"],
              "teacher_nll_per_byte": teacher_nll_per_byte(teacher(), teacher_tok, heldout, before_eval["texts"]),
              "example": before_eval["texts"][0][:200]}
    print(f"[quality] {student_name} before training: accuracy {before['accuracy']:.3f} {before['interval95']}, bpb "
          f"{before['bpb']:.4f}, teacher nll/byte of its answers {before['teacher_nll_per_byte']:.4f} "
          f"({time.perf_counter() - started:.0f}s)", flush=True)
    curve_steps = sorted({round(args.steps * (i + 1) / args.curve_points) for i in range(args.curve_points)})

    class Curve(TrainerCallback):
        def __init__(self):
            self.points: list[tuple[int, float]] = []

        def on_step_end(self, targs, state, control, model=None, **kwargs):
            if state.global_step in curve_steps[:-1]:  # the last point is the final evaluation
                self.points.append((state.global_step, evaluate(model)["accuracy"]))

    runs = []
    plan = [(m, "reference" if m == "sft" else "all") for m in args.methods]
    plan += [(m, "verified") for m in args.verified_methods if m in args.methods]
    # --set reaches every teacher method; a --sweep only the distillation losses (sft and seq_kd are cross-entropy)
    plan = [(m, v, {} if m == "sft" else {**args.overrides, **setting}, setting_label(setting))
            for m, v in plan for setting in (args.settings if m in DISTILLATION_METHODS else [{}])]
    for seed in args.seeds:
        for method, variant, overrides, label in plan:
            student = copy.deepcopy(base)
            curve = Curve()
            run_started = time.perf_counter()
            run_name = f"{method}-{variant}{'-' + label if label else ''}-seed{seed}"
            targs = train_args(args.work / tag / "runs" / run_name, steps=args.steps,
                               batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed,
                               max_completion_length=args.max_completion_length, warmup_steps=1,
                               **{**method_overrides(method), **overrides})
            trained = train_student(student, args=targs, train_dir=aligned[variant], pair=pair,
                                    teacher_model=teacher() if targs.lmbda > 0 else None, callbacks=[curve])
            final = evaluate(student)
            run = {"method": method, "variant": variant, "setting": label, "seed": seed, "accuracy": final["accuracy"],
                   "correct": final["correct"], "total": final["total"], "interval95": final["interval95"],
                   "gap_closed": accuracy_gap_closed(before["accuracy"], final["accuracy"], teacher_acc),
                   "bpb": student_bits_per_byte(student, held_rows, pair)["bits_per_byte"],
                   "teacher_nll_per_byte": teacher_nll_per_byte(teacher(), teacher_tok, heldout, final["texts"]),
                   "curve": [[0, before["accuracy"]]] + [list(p) for p in curve.points] + [[args.steps,
                                                                                           final["accuracy"]]],
                   "train_seconds": trained["seconds"], "mean_loss": trained["mean_loss"],
                   "seconds": round(time.perf_counter() - run_started, 1), "example": final["texts"][0][:200]}
            runs.append(run)
            print(f"[quality] {tag} {method:8s} {variant:9s}{' ' + label if label else ''} seed {seed}: accuracy {run['accuracy']:.3f} "
                  f"{run['interval95']}, bpb {run['bpb']:.4f}, teacher nll/byte {run['teacher_nll_per_byte']:.4f}, "
                  f"loss {run['mean_loss']:.4f}, train {run['train_seconds']:.0f}s / {run['seconds']:.0f}s",
                  flush=True)
            del student
            torch.set_num_threads(args.threads)
    return {"student": student_name, "teacher_bpb": teacher_bpb, "before": before, "runs": runs,
            "summary": summarize(runs)}


def accuracy_gap_closed(before: float, after: float, teacher: float) -> float | None:
    """(after - before) / (teacher - before); None when the teacher is no better than the student was."""
    return (after - before) / (teacher - before) if teacher > before else None


def summarize(runs: list[dict]) -> dict:
    from gold_pipeline.recipes.tasks import wilson_interval

    out = {}
    for key in dict.fromkeys((r["method"], r["variant"], r.get("setting", "")) for r in runs):
        mine = [r for r in runs if (r["method"], r["variant"], r.get("setting", "")) == key]
        correct, total = sum(r["correct"] for r in mine), sum(r["total"] for r in mine)
        entry = {k: mean_std([r[k] for r in mine]) for k in
                 ("accuracy", "gap_closed", "bpb", "teacher_nll_per_byte", "train_seconds")}
        entry["pooled_interval95"] = [round(x, 4) for x in wilson_interval(correct, total)]
        steps = [p[0] for p in mine[0]["curve"]]
        entry["curve"] = {"steps": steps, "accuracy": [statistics.fmean(r["curve"][i][1] for r in mine)
                                                        for i in range(len(steps))]}
        out[f"{key[0]}/{key[1]}" + (f" {key[2]}" if key[2] else "")] = entry
    return out


def draw_curves(results: list[dict], path: Path) -> None:
    from gold_pipeline.recipes.report import draw_panels, line_panel

    panels = []
    for result in results:
        series = {name: (entry["curve"]["steps"], entry["curve"]["accuracy"])
                  for name, entry in result["summary"].items()}
        panels.append(line_panel(f"held-out accuracy: {result['student']}", "exact match (mean over seeds)", series))
    draw_panels([p for p in panels if p is not None], path, title="gold bench/quality.py")


def _fmt(stat: dict, digits: int = 3, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def print_table(result: dict, teacher_acc: dict) -> None:
    before = result["before"]
    print(f"\n{result['student']}: teacher accuracy {100 * teacher_acc['accuracy']:.1f}% {teacher_acc['interval95']}, "
          f"student before {100 * before['accuracy']:.1f}% {before['interval95']}; teacher bpb "
          f"{result['teacher_bpb']:.3f}, student bpb before {before['bpb']:.3f}")
    print(f"{'method/variant':28s} {'accuracy %':>14s} {'pooled 95%':>15s} {'gap closed %':>14s} {'bpb':>14s} "
          f"{'teacher nll/B':>14s} {'train s':>9s}")
    for name, s in result["summary"].items():
        low, high = s["pooled_interval95"]
        print(f"{name:28s} {_fmt(s['accuracy'], 1, 100):>14s} {f'[{100 * low:.0f}, {100 * high:.0f}]':>15s} "
              f"{_fmt(s['gap_closed'], 1, 100):>14s} {_fmt(s['bpb']):>14s} {_fmt(s['teacher_nll_per_byte']):>14s} "
              f"{_fmt(s['train_seconds'], 0):>9s}")


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    import torch

    from gold_pipeline.models.loading import load_model, model_tokenizer_name
    from gold_pipeline.recipes.tasks import score_row
    from gold_pipeline.text.tokenizers import load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    holder: dict = {}

    def teacher():
        if "model" not in holder:
            holder["model"] = load_model(args.teacher).eval()
        return holder["model"]

    teacher_tok = load_tokenizer(model_tokenizer_name(args.teacher))
    train, heldout = prompt_rows(args)
    caches = {"all": cached(args, "train", train, teacher, temperature=args.teacher_temperature),
              "heldout": cached(args, "heldout", heldout, teacher, temperature=0.0)}
    held_texts = cache_completions(caches["heldout"])
    teacher_acc = accuracy(heldout, [held_texts[prompt_id(r)] for r in heldout])
    train_texts = cache_completions(caches["all"])
    verified = [with_completion(r, train_texts[prompt_id(r)]) for r in train
                if score_row(r, train_texts[prompt_id(r)])]
    teacher_train_acc = len(verified) / len(train)
    if "sft" in args.methods:
        reference = [with_completion(r, f"Answer: {r['answer']}") for r in train]
        caches["reference"] = cached(args, "reference", reference, teacher, temperature=0.0, score_only=True)
    if args.verified_methods:
        if len(verified) < args.batch_size:
            raise SystemExit(f"only {len(verified)} of {len(train)} teacher train answers are correct: fewer than one "
                             "batch; give more --train-count or drop --verified-methods.")
        caches["verified"] = cached(args, "verified", verified, teacher, temperature=0.0, score_only=True)
    data_seconds = time.perf_counter() - started
    print(f"[quality] data ready in {data_seconds:.0f}s: {len(train)} train prompts ({len(verified)} with a correct "
          f"teacher answer: {100 * teacher_train_acc:.1f}%), {len(heldout)} "
          f"{'validation (train stream)' if args.validate_on_train else 'held-out'}; teacher accuracy there "
          f"{100 * teacher_acc['accuracy']:.1f}% {teacher_acc['interval95']}", flush=True)

    results = [run_student(args, name, caches, heldout, teacher, teacher_tok, teacher_acc["accuracy"])
               for name in args.students]
    for result in results:
        print_table(result, teacher_acc)
    png = args.work / "quality_curves.png"
    draw_curves(results, png)
    out = {"bench": "quality", "teacher": args.teacher, "task": args.task if not args.train_prompts else "files",
           "train_prompts": len(train), "heldout_prompts": len(heldout), "verified_train_rows": len(verified),
           "teacher_accuracy": teacher_acc, "teacher_train_sampled_accuracy": teacher_train_acc,
           "threads": torch.get_num_threads(), "steps": args.steps, "batch_size": args.batch_size,
           "learning_rate": args.learning_rate, "fine_tuning": "full", "seeds": args.seeds,
           "top_k": args.top_k, "overrides": args.overrides, "sweep": args.sweep,
           "evaluated_on": f"train stream (--validate-on-train {args.validate_on_train})" if args.validate_on_train
           else "held-out", "data_seconds": round(data_seconds, 1), "png": str(png),
           "students": [{k: v for k, v in r.items()} for r in results],
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
