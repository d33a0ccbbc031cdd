"""Benchmark: seconds per optimizer step and peak memory of gold's GOLDTrainer against TRL 1.16's GOLDTrainer
on the same tiny models, data and settings, in one run.

Setting (DESIGN §6): cl100k student <- DeepSeek-V3 teacher (tiny Llama-style models from configs, real
packaged tokenizers), batch 4, max_completion_length 32, 2 threads, hybrid ULD. Cases:
  trl_off, trl_on                      TRL GOLDTrainer, lmbda 0 / 1
  gold_off, gold_on                    ours, default ULD mode ("exact")
  gold_off_fast, gold_on_fast          ours, "fast" ULD mode (top ranks sorted)
  gold_off_cached                      ours, off-policy teacher from cached top-K (K=64, no teacher model)
  gold_off_t135m, gold_off_cached_t135m
                                       the same two with a teacher of SmolLM2-135M's size (30 layers, hidden 576,
                                       random weights, DeepSeek vocabulary): what caching saves with a teacher
                                       whose forward pass is not negligible
Each case runs in its own process (peak RSS is per process). The last line is one JSON object.

`--pair real`: the users' shapes instead of tiny models: the real Qwen2.5-Coder-0.5B-Instruct teacher
(pkg:qwen2.5-coder-0.5b-instruct, 152k vocabulary) and the real SmolLM2-135M-Instruct student (49k), both
byte-level (so TRL runs the pair too), batch 4, 64 completion tokens. Cases trl_off, trl_on, gold_off, gold_on,
gold_off_cached and `floor`: the same student's plain cross-entropy step on the same batch plus the teacher's
forward pass on it (no distillation loss), the cost of running the two models at all.

    python bench/train.py [--steps 6] [--warmup 2] [--cases gold_off,trl_off]
    python bench/train.py --pair real [--steps 4] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT, TEACHER = "pkg:cl100k", "pkg:deepseek-v3"
BATCH, COMPLETION, THREADS, K = 4, 32, 2, 64
REAL_STUDENT, REAL_TEACHER, REAL_COMPLETION = "pkg:smollm2-135m-instruct", "pkg:qwen2.5-coder-0.5b-instruct", 64
REAL_CASES = ["trl_off", "trl_on", "gold_off", "gold_on", "gold_off_cached", "floor"]
PAIR = "tiny"  # set by --pair
CASES = ["trl_off", "trl_on", "gold_off", "gold_on", "gold_off_fast", "gold_on_fast", "gold_off_cached",
         "gold_off_t135m", "gold_off_cached_t135m"]
# teacher sizes: the tiny teacher, and SmolLM2-135M-Instruct's dimensions (its config, random weights)
TEACHER_SIZES = {
    "tiny": {},
    "t135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, tie_word_embeddings=True),
}


def conversations() -> list[dict]:
    """Real text nobody here wrote: the Zen of Python, as 'continue the text' conversations."""
    import codecs
    import this  # noqa: F401  (prints nothing when imported in a subprocess with redirected stdout)

    lines = [l for l in codecs.decode(this.s, "rot13").splitlines() if l.strip()][1:]
    rows = []
    for i in range(len(lines)):
        prompt = f"Continue the text after this line: {lines[i]}"
        completion = " ".join(lines[(i + 1 + j) % len(lines)] for j in range(3))
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    return rows * 4


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer._start)

        return _Cb()


def models(teacher_size: str = "tiny"):
    from gold_pipeline.models.loading import load_model, model_tokenizer_name, tiny_model_for
    from gold_pipeline.text.tokenizers import load_tokenizer

    s_tok, t_tok = load_tokenizer(model_tokenizer_name(STUDENT)), load_tokenizer(model_tokenizer_name(TEACHER))
    if PAIR == "real":
        return s_tok, t_tok, load_model(STUDENT, dtype="float32").train(), load_model(TEACHER, dtype="float32")
    return s_tok, t_tok, tiny_model_for(s_tok, seed=0), tiny_model_for(t_tok, seed=1, **TEACHER_SIZES[teacher_size])


def run_trl(lmbda: float, steps: int, work: Path, timer: StepTimer):
    import datasets
    from trl.experimental.gold import GOLDConfig as TRLConfig
    from trl.experimental.gold import GOLDTrainer as TRLTrainer

    s_tok, t_tok, student, teacher = models()
    t_dir = work / "teacher_tokenizer"
    t_tok.save_pretrained(str(t_dir))
    if s_tok.pad_token is None:
        s_tok.pad_token = s_tok.eos_token
    args = TRLConfig(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, disable_tqdm=True, max_completion_length=COMPLETION, lmbda=lmbda,
                     use_uld_loss=True, uld_use_hybrid_loss=True, teacher_tokenizer_name_or_path=str(t_dir),
                     dataloader_drop_last=True, bf16=False)
    trainer = TRLTrainer(model=student, teacher_model=teacher, args=args,
                         train_dataset=datasets.Dataset.from_list(conversations()), processing_class=s_tok,
                         callbacks=[timer.callback()])
    return trainer


def cached_topk_dir(work: Path, teacher, t_tok) -> Path:
    """Aligned shards (gold align) plus the teacher's exact top-K columns, as a teacher cache carries them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align
    from gold_pipeline.data.schemas import ALIGNED_SCHEMA

    source = work / "conversations.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in conversations()))
    out = work / "aligned"
    run_align(AlignConfig(out=str(out), student_tokenizer=STUDENT, teacher_tokenizer=TEACHER, dataset=str(source)))
    for path in sorted(out.glob("part-*.parquet")):
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            prompt, completion = row["teacher_prompt_ids"], row["teacher_completion_ids"]
            with torch.no_grad():
                logits = teacher(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            logprobs = torch.log_softmax(logits.float(), -1)  # (m, Vt)
            top = logprobs.topk(K, dim=-1)
            row["teacher_topk_ids"] = top.indices.tolist()
            row["teacher_topk_logprobs"] = top.values.tolist()
            row["teacher_token_logprobs"] = logprobs.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()
        pq.write_table(pa.Table.from_pylist(rows, schema=ALIGNED_SCHEMA), path)
    return out


def run_gold(lmbda: float, mode: str, cached: bool, steps: int, work: Path, timer: StepTimer,
             teacher_size: str = "tiny"):
    from gold_pipeline.training import GOLDConfig, GOLDTrainer

    s_tok, t_tok, student, teacher = models(teacher_size)
    data = cached_topk_dir(work, teacher, t_tok) if cached else conversations()
    args = GOLDConfig(output_dir=str(work / "gold"), per_device_train_batch_size=BATCH,
                      gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-4, logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                      max_completion_length=COMPLETION, lmbda=lmbda, use_uld_loss=True, uld_use_hybrid_loss=True,
                      uld_loss_mode=mode, dataloader_drop_last=True, metrics_jsonl=None)
    return GOLDTrainer(model=student, teacher_model=None if cached else teacher, args=args, train_dataset=data,
                       processing_class=s_tok, teacher_processing_class=t_tok, callbacks=[timer.callback()])


def run_floor(steps: int, timer: StepTimer):
    """The floor of a distillation step: the student's cross-entropy step on the same batches (prompt +
    reference completion, truncated to max_completion_length completion tokens) plus the teacher's forward pass
    on its own tokenization of them; AdamW at the same learning rate. Returns an object with .train() and
    .state.log_history like a Trainer."""
    import torch

    from gold_pipeline.text.encode import encode_completion, render_prompt_ids

    s_tok, t_tok, student, teacher = models()
    rows = conversations()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def batch_ids(tok, chunk):
        seqs = []
        for row in chunk:
            prompt = render_prompt_ids(tok, row["messages"][:-1])
            seqs.append(prompt + encode_completion(tok, row["messages"][-1]["content"])[:COMPLETION])
        width = max(map(len, seqs))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs])
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
        return ids, mask

    class Floor:
        class state:
            log_history: list = []

        def train(self):
            for step in range(steps):
                chunk = rows[(step * BATCH) % len(rows):][:BATCH]
                timer._start = time.perf_counter()
                s_ids, s_mask = batch_ids(s_tok, chunk)
                t_ids, t_mask = batch_ids(t_tok, chunk)
                with torch.no_grad():
                    teacher(input_ids=t_ids, attention_mask=t_mask)
                labels = s_ids.masked_fill(s_mask == 0, -100)
                loss = student(input_ids=s_ids, attention_mask=s_mask, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                timer.times.append(time.perf_counter() - timer._start)
                self.state.log_history.append({"loss": float(loss)})

    return Floor()


def one_case(case: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lmbda = 1.0 if "_on" in case else 0.0
        if case == "floor":
            trainer = run_floor(steps + warmup, timer)
        elif case.startswith("trl"):
            trainer = run_trl(lmbda, steps + warmup, work, timer)
        else:
            mode = "fast" if case.endswith("_fast") else "exact"
            size = "t135m" if case.endswith("_t135m") else "tiny"
            trainer = run_gold(lmbda, mode, "_cached" in case, steps + warmup, work, timer, size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    measured = timer.times[warmup:]
    return {
        "case": case,
        "s_per_step": statistics.median(measured),
        "s_per_step_mean": statistics.fmean(measured),
        "steps": len(measured),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_growth_mb": round(peak - rss_before, 1),
        "train_wall_s": round(wall, 2),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def configure(pair: str) -> None:
    """Module settings of the chosen pair (the tiny default, or the real Qwen2.5 -> SmolLM2 models)."""
    global PAIR, STUDENT, TEACHER, COMPLETION
    PAIR = pair
    if pair == "real":
        STUDENT, TEACHER, COMPLETION = REAL_STUDENT, REAL_TEACHER, REAL_COMPLETION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", default=None, help="comma-separated (default: all of the pair's cases)")
    parser.add_argument("--pair", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    configure(opts.pair)
    opts.cases = opts.cases or ",".join(REAL_CASES if opts.pair == "real" else CASES)
    if opts.one:
        print("RESULT " + json.dumps(one_case(opts.one, opts.steps, opts.warmup)), flush=True)
        return
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    results: dict[str, dict] = {}
    for case in opts.cases.split(","):
        cmd = [sys.executable, __file__, "--one", case, "--steps", str(opts.steps), "--warmup", str(opts.warmup),
               "--pair", opts.pair]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            results[case] = {"case": case, "error": (done.stderr or done.stdout)[-1500:]}
        else:
            results[case] = json.loads(line[len("RESULT "):])
        r = results[case]
        print(f"{case:22s} " + (f"{r['s_per_step']:.3f} s/step  peak {r['peak_rss_mb']:.0f} MB "
                                f"(+{r['peak_rss_growth_mb']:.0f} MB in train)  loss {r['first_loss']}->"
                                f"{r['last_loss']}" if "error" not in r else "ERROR " + r["error"][-400:]),
              flush=True)

    def ratio(a: str, b: str, key: str = "s_per_step"):
        if key in results.get(a, {}) and key in results.get(b, {}) and results[b][key]:
            return round(results[a][key] / results[b][key], 3)
        return None

    summary = {
        "setting": {"pair": opts.pair, "student": STUDENT, "teacher": TEACHER, "batch": BATCH, "max_completion_length": COMPLETION,
                    "threads": THREADS, "loss": "hybrid ULD", "topk": K, "steps": opts.steps, "warmup": opts.warmup,
                    "teacher_sizes": TEACHER_SIZES},
        "results": results,
        "speedup_off_policy": ratio("trl_off", "gold_off"),
        "speedup_on_policy": ratio("trl_on", "gold_on"),
        "speedup_off_policy_fast": ratio("trl_off", "gold_off_fast"),
        "speedup_on_policy_fast": ratio("trl_on", "gold_on_fast"),
        "peak_memory_ratio_off": ratio("gold_off", "trl_off", "peak_rss_mb"),
        "peak_memory_ratio_on": ratio("gold_on", "trl_on", "peak_rss_mb"),
        "peak_growth_ratio_off": ratio("gold_off", "trl_off", "peak_rss_growth_mb"),
        "cached_topk_speedup_vs_online_teacher": ratio("gold_off", "gold_off_cached"),
        "cached_topk_speedup_vs_online_teacher_t135m": ratio("gold_off_t135m", "gold_off_cached_t135m"),
        "off_policy_vs_floor": ratio("gold_off", "floor"),
        "trl_off_policy_vs_floor": ratio("trl_off", "floor"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
