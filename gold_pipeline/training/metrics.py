"""Training metrics: accumulation between logs (averaged across processes), a jsonl logger callback and
completion logging. Console and TensorBoard come from transformers' own callbacks (`report_to`)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback


class MetricsAccumulator:
    """Sums of per-micro-batch diagnostics and per-window counters between two `log` calls.

    `summary(accelerator)` reduces across processes (sum of sums, sum of weights) and resets.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.counters: dict[str, float] = defaultdict(float)
        self.window_sums: dict[str, float] = defaultdict(float)
        self.windows = 0
        self.started = time.perf_counter()

    def add_mean(self, name: str, value: float, weight: float = 1.0) -> None:
        self.sums[name] += float(value) * weight
        self.weights[name] += weight

    def add_window(self) -> None:
        """One optimizer window started (counted locally: every process sees the same windows)."""
        self.windows += 1

    def add_window_sum(self, name: str, value: float) -> None:
        """A window-normalized quantity: summed over micro-batches and processes, averaged over windows."""
        self.window_sums[name] += float(value)

    def add_count(self, name: str, value: float) -> None:
        self.counters[name] += float(value)

    def summary(self, accelerator) -> dict[str, float]:
        names = sorted(set(self.sums) | set(self.counters) | {f"window/{n}" for n in self.window_sums})
        # Every process must reduce the same vector: gather the names first.
        all_names = sorted({n for names_p in _gather_objects(accelerator, names) for n in names_p})
        vec = torch.tensor(
            [[self.sums.get(n, 0.0), self.weights.get(n, 0.0),
              self.window_sums.get(n[len("window/"):], 0.0) if n.startswith("window/") else self.counters.get(n, 0.0)]
             for n in all_names],
            dtype=torch.float64,
        ).reshape(-1, 3)
        elapsed = time.perf_counter() - self.started
        if accelerator is not None and accelerator.num_processes > 1:
            vec = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
        out: dict[str, float] = {}
        for n, (s, w, c) in zip(all_names, vec.tolist()):
            if n.startswith("window/"):
                if self.windows:
                    out[n[len("window/"):]] = c / self.windows
            elif w > 0:
                out[n] = s / w
            elif c:
                out[n] = c
        tokens = out.pop("counter/student_tokens", 0.0)
        generated = out.pop("counter/generated_tokens", 0.0)
        gen_time = out.pop("counter/generation_seconds", 0.0)
        world = accelerator.num_processes if accelerator is not None else 1
        excluded = out.pop("counter/excluded_student_tokens", 0.0)
        if elapsed > 0:
            out["tokens_per_second"] = tokens / elapsed
            # generation seconds are summed over processes, which run in parallel
            out["generation_time_share"] = min(1.0, gen_time / world / elapsed)
        if tokens:
            out["excluded_token_share"] = excluded / tokens
        if generated:
            out["generated_tokens"] = generated
        self.reset()
        return {k: round(v, 6) for k, v in out.items()}


def _gather_objects(accelerator, obj) -> list:
    if accelerator is None or accelerator.num_processes <= 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log dict (with step and epoch) to a jsonl file, on the main process only.

    The file belongs to one run: when training begins it is emptied, except that a resumed run keeps the lines
    up to the step it resumes from (so it reads as one uninterrupted run, never two runs mixed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = []
        if state.global_step > 0:  # resumed from a checkpoint at this step
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= state.global_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")


def log_completions(path: Path, step: int, samples: list[tuple[str, str, str]], limit: int | None) -> None:
    """Print (policy, prompt, completion) samples with rich and append them to completions.jsonl."""
    samples = samples if limit is None else samples[:limit]
    if not samples:
        return
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"completions at step {step}", show_lines=True)
        for column in ("policy", "prompt", "completion"):
            table.add_column(column)
        for policy, prompt, completion in samples:
            table.add_row(policy, prompt[-300:], completion[:500])
        Console().print(table)
    except ImportError:  # pragma: no cover - rich is a dependency
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for policy, prompt, completion in samples:
            handle.write(json.dumps({"step": step, "policy": policy, "prompt": prompt,
                                     "completion": completion}) + "\n")
