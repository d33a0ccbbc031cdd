"""Digits: the controlled experiment of issue 14 (does the projection loss recover what GOLD hybrid loses on numbers?).

A teacher whose tokenizer spells numbers one digit per token (pkg:qwen) and a student whose tokenizer has a token for
every 1- to 3-digit number (pkg:cl100k): in the hybrid loss no multi-digit student numeral is byte-identical to a
teacher token, so the whole answer of a group like student "82" ↔ teacher "8" "2" falls to the ULD part (sorted
probabilities, no token identity), while the matched part pulls the student towards the teacher's first digit "8",
a token it then has to continue from a context it never saw. The projection loss (losses/projection.py) gives the
student column "82" the teacher's chain-rule probability P(8) P(2 | 8) instead.

Protocol (everything from scratch on this machine, nothing tuned on held-out prompts):
  1. task: "a+b=" with a, b uniform in [10, 99] (2-digit addition, answers 20..198), as one user message; the
     answer is the bare number. Pairs are split once (fixed seed): held-out, student-train (a subset of the
     teacher-train pairs) and the rest of the teacher-train pairs.
  2. teacher: a Llama-style model (`--hidden`, `--layers`, `--heads`, `--intermediate`) with the pkg:qwen
     vocabulary, trained by plain cross-entropy on its completions ("82" + end of turn) for `--teacher-steps`
     steps; kept under --work keyed by every setting that shapes it. Its held-out accuracy is reported.
  3. teacher cache (`gold teacher-cache`'s hf backend with the trained model, greedy, top-K log-probs) of the
     student-train prompts, and `gold align` of it with the pkg:cl100k student (projection table included).
  4. students: the same model shape with the pkg:cl100k vocabulary, from the same random init per seed, trained
     with the project's trainer for `--steps` optimizer steps of `--batch-size` rows (AdamW, cosine, same rows in
     the same order per seed), one run per method and seed:
       seq_kd       cross-entropy on the teacher's completions
       gold_hybrid  GOLD hybrid (JSD on byte-identical tokens, ULD on the rest) from the cached top-K
       projection   gold_hybrid + uld_use_projection_loss (chain-rule projection of multi-token student tokens,
                    exclusive prefixes: each string counted once)
       projection_plain  the same with uld_projection_exclusive=False (the plain chain-rule values: the matched
                    first digit keeps the teacher's full mass)
  5. held-out greedy exact-match accuracy (completion stripped == the answer) with a 95 % Wilson interval per run
     and pooled over seeds; mean ± std over seeds; digit accuracy (share of answer digits right at their place,
     a smoother view of partial learning); train seconds. `--validate-on-train` evaluates on train pairs
     instead (to settle the task and budget without looking at held-out pairs); `--validate-on-unseen` on
     teacher-train pairs no student trains on (a validation split: it shows memorizing, which the train pairs
     cannot).

    .venv/bin/python bench/digits.py                  # the default configuration (docs/benchmarks.md)
    .venv/bin/python bench/digits.py --teacher-steps 40 --steps 4 --seeds 0 --train-count 64 --heldout-count 32
                                                      # a smoke run (about a minute)

The last output line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import cached, greedy_answers, mean_std, method_overrides, parse_override  # noqa: E402  (bench/quality.py)

REPO = Path(__file__).resolve().parents[1]
METHODS = ("seq_kd", "gold_hybrid", "projection", "projection_plain")
DEFAULT_METHODS = ("seq_kd", "gold_hybrid", "projection")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-tokenizer", default="pkg:qwen", help="one digit per token")
    p.add_argument("--student-tokenizer", default="pkg:cl100k", help="a token per 1- to 3-digit number")
    p.add_argument("--task", default="add", choices=("add", "copy"), help="see task_items")
    p.add_argument("--copy-digits", type=int, default=5, help="digits of the numbers of --task copy")
    p.add_argument("--low", type=int, default=10, help="smallest operand")
    p.add_argument("--high", type=int, default=99, help="largest operand")
    p.add_argument("--train-count", type=int, default=2048, help="student-train pairs (teacher-cached)")
    p.add_argument("--teacher-train-count", type=int, default=6000, help="teacher-train pairs (superset of the above)")
    p.add_argument("--heldout-count", type=int, default=256)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--validate-on-train", action="store_true",
                       help="evaluate students on --heldout-count student-train pairs instead of held-out ones")
    where.add_argument("--validate-on-unseen", action="store_true",
                       help="evaluate students on --heldout-count teacher-train pairs no student trains on (a "
                            "validation split: settle settings on it without looking at the held-out pairs)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--tie-student-embeddings", action="store_true",
                   help="students share one matrix for input embedding and output head (the teacher never does)")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--teacher-batch-size", type=int, default=64)
    p.add_argument("--teacher-learning-rate", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a GOLDConfig field for the distillation methods (not seq_kd), e.g. --set beta=0.0; "
                        "settle it with --validate-on-unseen")
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "digits")
    args = p.parse_args(argv)
    args.overrides = dict(parse_override(text, p) for text in args.overrides)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods {unknown} unknown; choose from {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pairs = (args.high - args.low + 1) ** 2 if args.task == "add" else 9 * 10 ** (args.copy_digits - 1)
    if args.validate_on_unseen and args.train_count + args.heldout_count > args.teacher_train_count:
        p.error(f"--validate-on-unseen needs train-count + heldout-count <= teacher-train-count "
                f"({args.train_count} + {args.heldout_count} > {args.teacher_train_count})")
    if args.teacher_train_count + args.heldout_count > pairs or args.train_count > args.teacher_train_count:
        p.error(f"{pairs} operand pairs: need train-count <= teacher-train-count and teacher-train-count + "
                f"heldout-count <= {pairs}")
    return args


# ----------------------------------------------------------------------------------------------------------
# Task rows.
# ----------------------------------------------------------------------------------------------------------


def row(question: str, answer: int) -> dict:
    return {"messages": [{"role": "user", "content": question}], "answer": str(answer)}


def task_items(args) -> list[tuple[str, int]]:
    """Every (question, answer) of the task, in one fixed shuffled order (seed 0).

    add:  "a+b=" -> a + b for every pair of operands in [--low, --high];
    copy: "n=" -> n for distinct n of --copy-digits digits (the simpler numeric task: the answer repeats the
          prompt's number, which both tokenizers spell the same way on both sides)."""
    rng = random.Random(0)
    if args.task == "add":
        items = [(f"{a}+{b}=", a + b) for a in range(args.low, args.high + 1) for b in range(args.low, args.high + 1)]
        rng.shuffle(items)
        return items
    low, high = 10 ** (args.copy_digits - 1), 10 ** args.copy_digits - 1
    numbers = rng.sample(range(low, high + 1), args.teacher_train_count + args.heldout_count)
    return [(f"{n}=", n) for n in numbers]


def split_rows(args) -> tuple[list[dict], list[dict], list[dict]]:
    """(teacher-train, student-train, held-out) rows: disjoint question sets; student-train is a prefix of
    teacher-train."""
    items = task_items(args)
    heldout = [row(q, a) for q, a in items[: args.heldout_count]]
    teacher_train = [row(q, a) for q, a in items[args.heldout_count : args.heldout_count + args.teacher_train_count]]
    return teacher_train, teacher_train[: args.train_count], heldout


def exact_match(rows: list[dict], texts: list[str]) -> dict:
    from gold_pipeline.recipes.tasks import wilson_interval

    correct = sum(text.strip() == r["answer"] for r, text in zip(rows, texts))
    low, high = wilson_interval(correct, len(rows))
    return {"correct": correct, "total": len(rows), "accuracy": correct / max(len(rows), 1),
            "interval95": [round(low, 4), round(high, 4)], "digit_accuracy": digit_accuracy(rows, texts)}


def digit_accuracy(rows: list[dict], texts: list[str]) -> float:
    """Share of the answers' digits that the texts (stripped) have at the same place; a digit past the end of a
    text is wrong, extra characters cost nothing beyond the exact-match figure."""
    right = total = 0
    for r, text in zip(rows, texts):
        answer, got = r["answer"], text.strip()
        total += len(answer)
        right += sum(a == b for a, b in zip(answer, got))
    return right / max(total, 1)


# ----------------------------------------------------------------------------------------------------------
# The teacher: trained here by plain cross-entropy on its completions, kept on disk.
# ----------------------------------------------------------------------------------------------------------


def model_shape(args) -> dict:
    return dict(hidden_size=args.hidden, layers=args.layers, heads=args.heads, intermediate_size=args.intermediate)


def train_teacher(args, tokenizer, rows: list[dict]):
    """(teacher model, train seconds, digest of its settings); from --work when a run with the same settings already
    trained it (0 seconds then).

    Plain cross-entropy over the full vocabulary, computed cheaply: only the ids that occur in the task's
    sequences (digits, "+", "=", the chat markers, end of turn: a few dozen) get trained output rows; every other
    output row is held at zero, so its logit is exactly 0 and the full-vocabulary log-sum-exp is
    logsumexp(task logits, log(number of other ids)). Training runs on a model with only the task ids as its
    vocabulary plus that constant; the result is then written into a full-vocabulary model (other output rows 0),
    which is the model `gold teacher-cache` sees: its top-K and tail mass are the full-vocabulary ones.
    """
    import math

    import torch

    from gold_pipeline.recipes.demo import build_student
    from gold_pipeline.text.encode import encode_completion, render_prompts_ids
    from gold_pipeline.text.pair import TokenizerSide

    key = {"tokenizer": args.teacher_tokenizer, "shape": model_shape(args), "steps": args.teacher_steps,
           "batch": args.teacher_batch_size, "lr": args.teacher_learning_rate, "rows": [r["messages"] for r in rows],
           "answers": [r["answer"] for r in rows], "version": 2}  # rows differ per --task
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = args.work / "teacher" / f"teacher-{digest}.pt"
    full = build_student(tokenizer, **model_shape(args), seed=1234)
    if path.exists():
        full.load_state_dict(torch.load(path, weights_only=True))
        print(f"[digits] teacher loaded from {path}", flush=True)
        return full.eval(), 0.0, digest
    side = TokenizerSide.of(tokenizer)
    stop = list(side.stop_ids)[0]
    prompts = render_prompts_ids(tokenizer, [r["messages"] for r in rows])
    completions = [encode_completion(tokenizer, r["answer"]) + [stop] for r in rows]
    task_ids = sorted({i for seq in prompts + completions for i in seq} | {side.pad_id})  # (n,) full-vocab ids
    small_of = {full_id: k for k, full_id in enumerate(task_ids)}
    others = math.log(full.config.vocab_size - len(task_ids))  # log-sum-exp of the zero logits of all other ids
    small = build_student(tokenizer, **model_shape(args), seed=1234)
    small.resize_token_embeddings(len(task_ids))
    small.lm_head.weight.data.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    prompts = [[small_of[i] for i in seq] for seq in prompts]
    completions = [[small_of[i] for i in seq] for seq in completions]
    pad = small_of[side.pad_id]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(small.parameters(), lr=args.teacher_learning_rate, weight_decay=0.0)
    warmup = max(1, args.teacher_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.teacher_steps) / args.teacher_steps)))
    small.train()
    started = time.perf_counter()
    for step in range(args.teacher_steps):
        index = torch.randint(len(rows), (args.teacher_batch_size,), generator=generator).tolist()
        seqs = [prompts[i] + completions[i] for i in index]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (B, T) right-padded
        mask = torch.zeros_like(ids)
        targets = torch.full_like(ids, -100)  # (B, T): the completion token each position predicts
        for b, i in enumerate(index):
            n_p, n_c = len(prompts[i]), len(completions[i])
            ids[b, : n_p + n_c] = torch.tensor(seqs[b])
            mask[b, : n_p + n_c] = 1
            targets[b, n_p - 1 : n_p + n_c - 1] = torch.tensor(completions[i])
        hidden = small.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        keep = targets >= 0
        logits = small.lm_head(hidden[keep]).float()  # (N, n): completion positions, task ids
        rest = torch.full((logits.shape[0], 1), others)  # (N, 1): every other id, logit 0 each
        loss = torch.nn.functional.cross_entropy(torch.cat([logits, rest], dim=1), targets[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, args.teacher_steps // 5) == 0:
            print(f"[digits] teacher step {step + 1}/{args.teacher_steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    seconds = time.perf_counter() - started
    with torch.no_grad():  # into the full-vocabulary model: same body, task rows in place, other output rows 0
        state = {k: v for k, v in small.state_dict().items() if k not in ("model.embed_tokens.weight",
                                                                          "lm_head.weight")}
        full.load_state_dict(state, strict=False)
        index = torch.tensor(task_ids)
        full.model.embed_tokens.weight[index] = small.model.embed_tokens.weight
        full.lm_head.weight.zero_()
        full.lm_head.weight[index] = small.lm_head.weight
    full.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(full.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return full, seconds, digest


# ----------------------------------------------------------------------------------------------------------
# Students.
# ----------------------------------------------------------------------------------------------------------


def method_fields(method: str) -> dict:
    """GOLDConfig fields of each method (bench/quality.py's seq_kd and gold_off; projection on top of the latter)."""
    if method == "projection_plain":
        return method_overrides("proj_off") | {"uld_projection_exclusive": False}
    return method_overrides({"seq_kd": "seq_kd", "gold_hybrid": "gold_off", "projection": "proj_off"}[method])


def main(argv=None) -> dict:
    import torch

    from gold_pipeline.recipes.demo import align_cache, build_student, train_args, train_student
    from gold_pipeline.recipes.inspect import inspect_output
    from gold_pipeline.recipes.tasks import wilson_interval
    from gold_pipeline.text.pair import TokenizerPair
    from gold_pipeline.text.tokenizers import load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teacher_tok = load_tokenizer(args.teacher_tokenizer)
    student_tok = load_tokenizer(args.student_tokenizer)
    teacher_train, train, heldout = split_rows(args)
    eval_rows, where = heldout, "held-out pairs"
    if args.validate_on_train:
        eval_rows, where = train[: args.heldout_count], "student-train pairs (--validate-on-train)"
    elif args.validate_on_unseen:  # teacher-train pairs after the student-train ones: no student sees them
        eval_rows = teacher_train[args.train_count: args.train_count + args.heldout_count]
        where = "teacher-train pairs no student trains on (--validate-on-unseen)"
    max_new = max(len(r["answer"]) for r in teacher_train + heldout) + 1  # the teacher's digits + end of turn

    teacher, teacher_seconds, teacher_digest = train_teacher(args, teacher_tok, teacher_train)
    teacher_acc = exact_match(heldout, greedy_answers(teacher, teacher_tok, heldout, max_new_tokens=max_new,
                                                      batch_size=args.eval_batch_size))
    teacher_train_acc = exact_match(train[:256], greedy_answers(teacher, teacher_tok, train[:256],
                                                                max_new_tokens=max_new,
                                                                batch_size=args.eval_batch_size))
    print(f"[digits] teacher ({args.teacher_tokenizer}): held-out accuracy {100 * teacher_acc['accuracy']:.1f}% "
          f"{teacher_acc['interval95']}, student-train {100 * teacher_train_acc['accuracy']:.1f}%; trained in "
          f"{teacher_seconds:.0f}s", flush=True)

    data_started = time.perf_counter()
    # bench/quality.py's teacher cache (greedy, top-K; reused while its key matches), one folder per teacher
    settings = SimpleNamespace(teacher=args.teacher_tokenizer, top_k=args.top_k, max_new_tokens=max_new,
                               fresh_cache=False, teacher_batch_size=args.eval_batch_size, work=args.work)
    cache_dir = cached(settings, f"train-{teacher_digest}", [{"messages": r["messages"], "answer": r["answer"]}
                                                              for r in train], lambda: teacher, temperature=0.0)
    aligned_dir = args.work / "data" / f"aligned-{teacher_digest}"
    align_cache(student_tokenizer=args.student_tokenizer, teacher_cache=cache_dir, out=aligned_dir, overwrite=True)
    projection = inspect_output(aligned_dir, top=0)["projection"]
    print(f"[digits] teacher cache + align of {len(train)} rows in {time.perf_counter() - data_started:.0f}s; "
          f"student numeral tokens covered by matched ∪ projected: {projection.get('numeral_share')}, matched alone "
          f"{projection.get('numeral_matched_share')}", flush=True)

    pair = TokenizerPair.build(student_tok, teacher_tok)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            student = build_student(student_tok, **model_shape(args), seed=seed,
                                    tie_embeddings=args.tie_student_embeddings)
            targs = train_args(args.work / "runs" / f"{method}-seed{seed}", steps=args.steps,
                               batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed,
                               max_completion_length=max_new + 2, warmup_steps=max(1, args.steps // 20),
                               **{**method_fields(method), **({} if method == "seq_kd" else args.overrides)})
            trained = train_student(student, args=targs, train_dir=aligned_dir, pair=pair)
            texts = greedy_answers(student, student_tok, eval_rows, max_new_tokens=max_new,
                                   batch_size=args.eval_batch_size)
            result = exact_match(eval_rows, texts)
            seen = train[: args.heldout_count]  # the train split too: did the method learn the rows it saw?
            on_train = exact_match(seen, greedy_answers(student, student_tok, seen, max_new_tokens=max_new,
                                                        batch_size=args.eval_batch_size))
            runs.append({"method": method, "seed": seed, **result, "train_accuracy": on_train["accuracy"],
                         "train_digit_accuracy": on_train["digit_accuracy"],
                         "train_seconds": trained["seconds"],
                         "mean_loss": trained["mean_loss"], "examples": [[r["messages"][0]["content"], t]
                                                                         for r, t in zip(eval_rows[:3], texts)]})
            print(f"[digits] {method:12s} seed {seed}: accuracy {100 * result['accuracy']:.1f}% "
                  f"{result['interval95']}, digits {100 * result['digit_accuracy']:.1f}% (train split "
                  f"{100 * on_train['accuracy']:.1f}%), loss {trained['mean_loss']:.4f}, "
                  f"train {trained['seconds']:.0f}s, "
                  f"e.g. {runs[-1]['examples'][0]}", flush=True)
            del student
            torch.set_num_threads(args.threads)

    summary = {}
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        correct, total = sum(r["correct"] for r in mine), sum(r["total"] for r in mine)
        summary[method] = {"accuracy": mean_std([r["accuracy"] for r in mine]),
                           "pooled_interval95": [round(x, 4) for x in wilson_interval(correct, total)],
                           "per_seed": [r["accuracy"] for r in mine],
                           "digit_accuracy": mean_std([r["digit_accuracy"] for r in mine]),
                           "train_accuracy": mean_std([r["train_accuracy"] for r in mine]),
                           "train_seconds": mean_std([r["train_seconds"] for r in mine])}
    print(f"\n{args.student_tokenizer} students from {args.teacher_tokenizer} teacher; {len(eval_rows)} {where}; "
          f"teacher {100 * teacher_acc['accuracy']:.1f}% {teacher_acc['interval95']}")
    print(f"{'method':16s} {'accuracy %':>14s} {'pooled 95%':>14s} {'per seed %':>22s} {'digits %':>14s} "
          f"{'train-split %':>14s} {'train s':>8s}")
    for method, s in summary.items():
        acc = s["accuracy"]
        low, high = s["pooled_interval95"]
        per_seed = " ".join(f"{100 * a:.1f}" for a in s["per_seed"])
        digits = f"{100 * s['digit_accuracy']['mean']:.1f} ± {100 * s['digit_accuracy']['std']:.1f}"
        print(f"{method:16s} {100 * acc['mean']:7.1f} ± {100 * acc['std']:4.1f} "
              f"{f'[{100 * low:.1f}, {100 * high:.1f}]':>14s} {per_seed:>22s} "
              f"{digits:>14s} "
              f"{100 * s['train_accuracy']['mean']:14.1f} {s['train_seconds']['mean']:8.0f}")
    out = {"bench": "digits", "teacher_tokenizer": args.teacher_tokenizer, "student_tokenizer": args.student_tokenizer,
           "task": f"a+b=, a and b in [{args.low}, {args.high}]" if args.task == "add" else
           f"n= -> n, {args.copy_digits}-digit n", "model_shape": model_shape(args),
           "tied_student_embeddings": args.tie_student_embeddings,
           "teacher_steps": args.teacher_steps, "teacher_train_pairs": len(teacher_train),
           "teacher_seconds": round(teacher_seconds, 1), "teacher_accuracy": teacher_acc,
           "teacher_student_train_accuracy": teacher_train_acc, "projection_coverage": projection,
           "train_pairs": len(train), "evaluated_on": where, "eval_pairs": len(eval_rows), "steps": args.steps,
           "overrides": args.overrides, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
           "top_k": args.top_k, "seeds": args.seeds, "threads": torch.get_num_threads(), "runs": runs,
           "methods": {m: {"accuracy_mean": s["accuracy"]["mean"], "accuracy_std": s["accuracy"]["std"],
                           "pooled_interval95": s["pooled_interval95"],
                           "digit_accuracy_mean": s["digit_accuracy"]["mean"],
                           "digit_accuracy_std": s["digit_accuracy"]["std"],
                           "train_split_accuracy_mean": s["train_accuracy"]["mean"]} for m, s in summary.items()},
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
