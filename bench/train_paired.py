"""Paired benchmark: off-policy GOLD micro-steps with the online teacher vs the cached top-K teacher, interleaved in
one process, so both sides see the same machine speed (the 2-core VM drifts by ±20 % between runs of
bench/train.py). Same setting as bench/train.py (cl100k student <- DeepSeek teacher, batch 4, 32 completion tokens,
hybrid ULD, K = 64, 2 threads).

Each repetition times ``compute_loss + backward`` (no optimizer step, which costs the same on both paths) on each
path in turn, cycling over 4 prepared batches. ``--ceiling`` adds a third path: the cached path with the top-K loss
replaced by the same student-side work (split, matched JSD, sorted L1) against constant teacher tensors, i.e. a
cached teacher that costs nothing: the most caching can gain with this teacher. Last line: one JSON object.

    python bench/train_paired.py [--reps 40] [--ceiling]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import train as B  # noqa: E402  (bench/train.py: models, data and trainer setup)


def free_teacher_loss():
    """A stand-in for ``hybrid_loss_topk``: the student side of the hybrid loss against constant teacher tensors."""
    from gold_pipeline.losses.hybrid import jsd_on_columns, split_columns
    from gold_pipeline.losses.uld import sorted_l1

    constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def loss(student_merged, teacher, vocab_map, denominator=None, **_):
        split, groups = vocab_map, student_merged.shape[0]
        s_m, s_u = split_columns(student_merged, split.student_matched, split.student_unmatched,
                                 split.student_ids_unique)  # (G, M), (G, Us)
        if groups not in constants:
            gen = torch.Generator().manual_seed(groups)
            t_m = torch.log_softmax(torch.randn(groups, s_m.shape[1], generator=gen), -1)
            t_u = torch.log_softmax(torch.randn(groups, split.teacher_unmatched.numel(), generator=gen), -1)
            constants[groups] = (t_m, t_u.sort(1, descending=True).values)
        t_m, t_u = constants[groups]
        l1, _ = sorted_l1(s_u, t_u, teacher_sorted=True)
        return (jsd_on_columns(s_m, t_m, beta=0.5).sum() + l1.sum()) / float(denominator or 1.0), {}

    return loss


def prepared(name: str, work: Path, batches: int = 4):
    trainer = B.run_gold(0.0, "exact", name != "online", 10, work, B.StepTimer())
    it = iter(trainer.get_train_dataloader())
    return trainer, [trainer.get_batch_samples(it, 1, torch.device("cpu")) for _ in range(batches)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ceiling", action="store_true", help="also time the cached path with a free teacher side")
    opts = parser.parse_args()
    torch.set_num_threads(B.THREADS)
    import gold_pipeline.training.loss as training_loss

    real_topk_loss = training_loss.hybrid_loss_topk
    names = ["online", "cached"] + (["free_teacher"] if opts.ceiling else [])
    times: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        for name in names:
            (Path(tmp) / name).mkdir()
            with contextlib.redirect_stdout(sys.stderr):  # `import this` in bench/train.py prints the Zen
                setups[name] = prepared(name, Path(tmp) / name)
        stand_in = free_teacher_loss()
        for rep in range(opts.reps + opts.warmup):
            for name in names:
                trainer, batches = setups[name]
                training_loss.hybrid_loss_topk = stand_in if name == "free_teacher" else real_topk_loss
                micro, window = batches[rep % len(batches)]
                started = time.perf_counter()
                trainer.compute_loss(trainer.model, micro[0], num_items_in_batch=window).backward()
                if rep >= opts.warmup:
                    times[name].append(time.perf_counter() - started)
                trainer.model.zero_grad(set_to_none=True)
        training_loss.hybrid_loss_topk = real_topk_loss
    summary = {"setting": {"student": B.STUDENT, "teacher": B.TEACHER, "batch": B.BATCH, "topk": B.K,
                           "threads": B.THREADS, "reps": opts.reps, "timed": "compute_loss + backward"}}
    for name in names:
        summary[f"{name}_median_s"] = round(statistics.median(times[name]), 4)
    for name in names[1:]:
        paired = [a / b for a, b in zip(times["online"], times[name])]
        summary[f"{name}_speedup_vs_online_paired_median"] = round(statistics.median(paired), 3)
        print(f"{name:12s} {summary[f'{name}_median_s']:.3f} s vs online {summary['online_median_s']:.3f} s: "
              f"paired median {summary[f'{name}_speedup_vs_online_paired_median']:.2f}x", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
