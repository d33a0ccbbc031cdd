"""Benchmark of `gold teacher-cache` on this machine (CPU, 2 threads). Last line: one JSON object.

Measures
  - tokens/s per backend: hf with a tiny random model, hf with the real SmolLM2-135M-Instruct, and openai against
    a llama.cpp server (llama-cpp-python serving the same GGUF) when llama_cpp is importable;
  - the hf backend alone on the real SmolLM2, log-probs recorded during generation (single pass, what gold runs)
    against generate-then-score (two passes, the former path), alternated in one process, the same ids asserted
    (`--passes-only` measures just this);
  - bytes per teacher token at K = 16 and 64: uncompressed Arrow payload and zstd Parquet on disk (real rows);
  - the top-K error of the losses: ULD and hybrid computed with the cached top-K teacher vs the exact full teacher
    distribution, on real SmolLM2 teacher log-probs, with Gemma-3-270M as a cross-tokenizer student (real GOLD
    setting: byte alignment, first-position merge, vocab map).

    .venv/bin/python bench/teacher_cache.py [--prompts 8] [--max-new-tokens 48] [--no-server] [--passes-only]
                                            [--pass-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gold_pipeline.data.schemas import TEACHER_SCHEMA
from gold_pipeline.models.generation import sample_seed
from gold_pipeline.models.loading import PKG_MODELS, load_model, tiny_model_for
from gold_pipeline.teacher_cache import TeacherCacheConfig, bytes_per_teacher_token, run_teacher_cache  # noqa: E402
from gold_pipeline.teacher_cache.base import TeacherRequest
from gold_pipeline.teacher_cache.hf import HFBackend
from gold_pipeline.teacher_cache.job import teacher_stop_ids
from gold_pipeline.text.encode import render_prompt_ids
from gold_pipeline.text.pair import pad_token_id
from gold_pipeline.text.tokenizers import load_tokenizer

TEACHER = "pkg:smollm2-135m-instruct"
STUDENT = "pkg:gemma3-270m"
PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What is the capital of Japan, and what is it known for?",
    "Give three tips for learning a new language.",
    "Describe how a bicycle works.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "What is 17 times 23? Show your steps.",
    "List four planets of the solar system.",
    "What makes a good cup of coffee?",
    "Explain recursion to a child.",
]


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})")})
                            + "\n" for i in range(count)))
    return path


def run(cfg: TeacherCacheConfig, model=None) -> dict:
    """tokens/s of wall time (model loaded), and per CPU-second of this process (robust to a busy machine)."""
    cpu = time.process_time()
    summary = run_teacher_cache(cfg, model=model)
    cpu = time.process_time() - cpu
    return {"top_k": cfg.top_k, "rows": summary["rows"], "teacher_tokens": summary["teacher_tokens"],
            "seconds": round(summary["seconds"], 2), "tokens_per_s": round(summary["new_tokens_per_s"], 2),
            "tokens_per_cpu_s": round(summary["new_teacher_tokens"] / cpu, 2) if cfg.backend == "hf" else None,
            "disk_bytes_per_teacher_token": round(summary["disk_bytes_per_teacher_token"], 1)}


def bench_passes(teacher, tokenizer, prompts: int, max_new_tokens: int, k: int, repeats: int) -> dict:
    """The hf backend alone (no Parquet): tokens/s with the log-probs recorded during generation (single pass)
    and with a second, teacher-forced scoring pass (two passes), alternated `repeats` times; the ids of the two
    must be identical. Per wall second (median of the repeats) and per CPU-second of this process."""
    requests = []
    for i in range(prompts):
        text = PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})")
        requests.append(TeacherRequest(sample_id=f"bench-{i}", seed=sample_seed(0, f"bench-{i}"),
                                       prompt_ids=render_prompt_ids(tokenizer, [{"role": "user", "content": text}])))
    backends = {mode: HFBackend(teacher, top_k=k, stop_ids=teacher_stop_ids(tokenizer), pad_id=pad_token_id(tokenizer),
                                temperature=0.7, max_new_tokens=max_new_tokens, batch_size=8, device="cpu",
                                single_pass=mode == "single_pass")
                for mode in ("two_pass", "single_pass")}
    wall = {mode: [] for mode in backends}
    cpu = {mode: [] for mode in backends}
    outputs = {}
    for _ in range(repeats):
        for mode, backend in backends.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[mode] = backend.run(requests)
            wall[mode].append(time.perf_counter() - started)
            cpu[mode].append(time.process_time() - cpu_started)
    single, two = outputs["single_pass"], outputs["two_pass"]
    assert [r.completion_ids for r in single] == [r.completion_ids for r in two], "single and two pass ids differ"
    tokens = sum(len(r.completion_ids) for r in single)
    max_dev = max(max(float(np.abs(a.token_logprobs - b.token_logprobs).max()),
                      float(np.abs(a.topk_logprobs - b.topk_logprobs).max())) for a, b in zip(single, two))
    topk_ids_equal = all(np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(single, two))
    out = {"rows": len(requests), "new_tokens": tokens, "top_k": k, "temperature": 0.7, "repeats": repeats,
           "ids_identical": True, "topk_ids_identical": topk_ids_equal, "max_abs_logprob_dev": max_dev}
    for mode in backends:
        out[mode] = {"seconds": [round(x, 2) for x in wall[mode]],
                     "tokens_per_s": round(tokens / float(np.median(wall[mode])), 2),
                     "tokens_per_cpu_s": round(tokens / float(np.median(cpu[mode])), 2)}
    out["speedup_wall"] = round(out["single_pass"]["tokens_per_s"] / out["two_pass"]["tokens_per_s"], 3)
    out["speedup_cpu"] = round(out["single_pass"]["tokens_per_cpu_s"] / out["two_pass"]["tokens_per_cpu_s"], 3)
    return out


def disk_bytes_at_k(out: Path, k: int, work: Path) -> float:
    """zstd Parquet bytes per teacher token when the same rows keep only their first k entries."""
    table = pq.read_table(str(out / "part-00000.parquet"))
    for part in sorted(out.glob("part-*.parquet"))[1:]:
        table = pa.concat_tables([table, pq.read_table(str(part))])
    frame = pl.from_arrow(table).with_columns(
        pl.col("teacher_topk_ids").list.eval(pl.element().list.head(k)),
        pl.col("teacher_topk_logprobs").list.eval(pl.element().list.head(k)),
    )
    sliced = frame.to_arrow().cast(TEACHER_SCHEMA)
    path = work / f"k{k}.parquet"
    pq.write_table(sliced, path, compression="zstd")
    tokens = sum(len(x) for x in frame["teacher_completion_ids"].to_list())
    return path.stat().st_size / tokens


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_openai(dataset: Path, work: Path, max_new_tokens: int, k: int) -> dict:
    try:
        import llama_cpp  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return {"skipped": f"llama-cpp-python[server] not importable: {error}"}
    import requests

    port = _free_port()
    gguf = PKG_MODELS[TEACHER].gguf_path()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "2048"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        cfg = TeacherCacheConfig(dataset=str(dataset), out=work / "openai", teacher="smollm2",
                                 teacher_tokenizer="pkg:smollm2", backend="openai",
                                 base_url=f"http://127.0.0.1:{port}/v1", top_k=k, max_new_tokens=max_new_tokens,
                                 temperature=0.7, concurrency=1, skip_invalid=True, progress=False)
        result = run(cfg)
        stats = json.loads((work / "openai" / "manifest.json").read_text())["stats"]
        result["topk_unnamed_per_token"] = round(stats.get("openai_topk_unnamed", 0) / max(stats["teacher_tokens"], 1), 3)
        result["topk_padded_slots"] = stats.get("openai_topk_padded", 0)
        result["rows_skipped_unmappable"] = stats.get("skipped_unmappable", 0)
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


@torch.no_grad()
def loss_deviation(out: Path, teacher_model, ks: list[int]) -> dict:
    """Relative |topk loss - exact loss| of ULD and hybrid on real teacher log-probs (cross-tokenizer student)."""
    from gold_pipeline.align.groups import align_completion
    from gold_pipeline.losses import (
        hybrid_loss,
        hybrid_loss_topk,
        merged_logprobs,
        merged_topk,
        uld_loss,
        uld_loss_topk,
        vocab_split,
    )
    from gold_pipeline.text.bytes import byte_table
    from gold_pipeline.text.encode import encode_completion, end_of_turn_ids, render_prompt_ids
    from gold_pipeline.text.vocab_map import build_vocab_map

    teacher_tok, student_tok = load_tokenizer("pkg:smollm2"), load_tokenizer("pkg:gemma3")
    student_model = load_model(STUDENT)
    teacher_table, student_table = byte_table(teacher_tok), byte_table(student_tok)
    vocab_map = build_vocab_map(student_table, teacher_table)
    rows = pl.read_parquet(str(out / "*.parquet")).to_dicts()
    student_merged_all, teacher_exact_all, topk_parts = [], [], {k: [] for k in ks}
    tail_mass = {k: [] for k in ks}
    for row in rows:
        teacher_ids = row["teacher_completion_ids"]
        student_ids = encode_completion(student_tok, row["completion_text"]) + end_of_turn_ids(student_tok)
        alignment = align_completion(student_ids, teacher_ids, student_table, teacher_table, row["completion_text"])
        groups = alignment.num_groups
        if groups == 0:
            continue
        t_prompt = row["teacher_prompt_ids"]
        t_logits = teacher_model(torch.tensor([t_prompt + teacher_ids])).logits[0].float()
        t_lp = torch.log_softmax(t_logits[len(t_prompt) - 1 : len(t_prompt) - 1 + len(teacher_ids)], -1)   # (m, Vt)
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        s_prompt_ids = render_prompt_ids(student_tok, messages)
        s_logits = student_model(torch.tensor([s_prompt_ids + student_ids])).logits[0].float()
        s_lp = torch.log_softmax(s_logits[len(s_prompt_ids) - 1 : len(s_prompt_ids) - 1 + len(student_ids)], -1)
        t_groups = torch.tensor(alignment.teacher_group_ids, dtype=torch.long)
        s_groups = torch.tensor(alignment.student_group_ids, dtype=torch.long)
        t_ids = torch.tensor(teacher_ids)
        student_merged_all.append(merged_logprobs(s_lp, torch.tensor(student_ids), s_groups, groups))
        teacher_exact_all.append(merged_logprobs(t_lp, t_ids, t_groups, groups))
        stored_ids = torch.tensor(row["teacher_topk_ids"], dtype=torch.long)
        stored_lp = torch.tensor(np.asarray(row["teacher_topk_logprobs"], dtype=np.float32))
        token_lp = torch.tensor(np.asarray(row["teacher_token_logprobs"], dtype=np.float32))
        for k in ks:
            part = merged_topk(stored_ids[:, :k], stored_lp[:, :k], token_lp, t_groups, groups)
            topk_parts[k].append(part)
            tail_mass[k].append(1 - stored_lp[:, :k].exp().sum(-1))
    student_merged = torch.cat(student_merged_all)
    teacher_exact = torch.cat(teacher_exact_all)
    split = vocab_split(vocab_map, student_merged.shape[1], teacher_exact.shape[1])
    uld_exact = float(uld_loss(student_merged, teacher_exact)[0])
    hybrid_exact = float(hybrid_loss(student_merged, teacher_exact, split)[0])
    out_stats = {"groups": int(student_merged.shape[0]), "uld_exact": round(uld_exact, 5),
                 "hybrid_exact": round(hybrid_exact, 5), "vocab_map_pairs": int(len(vocab_map))}
    from gold_pipeline.losses import TopkMerged

    for k in ks:
        parts = topk_parts[k]
        teacher_topk = TopkMerged(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                                  torch.cat([p.tail_logprob for p in parts]))
        vt = teacher_exact.shape[1]
        uld_k = float(uld_loss_topk(student_merged, teacher_topk, vt)[0])
        hybrid_k, diag = hybrid_loss_topk(student_merged, teacher_topk, split)
        hybrid_k = float(hybrid_k)
        # for contrast: the tail as one bucket of mass T (the form before the power-law tail model)
        uld_bucket = float(uld_loss(student_merged, teacher_topk.dense_values())[0])
        w_m, w_u, unm = diag["matched_weight"], diag["unmatched_weight"], diag["unmatched"]
        out_stats[f"k{k}"] = {
            "uld": round(uld_k, 5), "uld_rel_dev": round(abs(uld_k - uld_exact) / abs(uld_exact), 5),
            "hybrid": round(hybrid_k, 5), "hybrid_rel_dev": round(abs(hybrid_k - hybrid_exact) / abs(hybrid_exact), 5),
            "uld_one_bucket_rel_dev": round(abs(uld_bucket - uld_exact) / abs(uld_exact), 5),
            # the hybrid loss with the matched part at either end of its bracket (coarsened / unassociated tail)
            "hybrid_low_rel_dev": round((w_m * diag["matched_low"] + w_u * unm - hybrid_exact) / hybrid_exact, 5),
            "hybrid_high_rel_dev": round((w_m * diag["matched_high"] + w_u * unm - hybrid_exact) / hybrid_exact, 5),
            "mean_teacher_tail_mass": round(float(torch.cat(tail_mass[k]).clamp_min(0).mean()), 5),
        }
    return out_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-server", action="store_true", help="skip the llama.cpp server backend")
    parser.add_argument("--passes-only", action="store_true",
                        help="only the single- vs two-pass comparison of the hf backend on SmolLM2")
    parser.add_argument("--pass-repeats", type=int, default=3, help="alternated runs of each mode (median)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict = {"threads": 2, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens}
    if args.passes_only:
        teacher = load_model(TEACHER)
        results["hf_smollm2_passes_k64"] = bench_passes(teacher, load_tokenizer("pkg:smollm2"), args.prompts,
                                                        args.max_new_tokens, 64, args.pass_repeats)
        print(json.dumps(results))
        return
    with tempfile.TemporaryDirectory(prefix="gold-bench-tc-") as tmp:
        work = Path(tmp)
        dataset = write_prompts(work / "prompts.jsonl", args.prompts)
        tokenizer = load_tokenizer("pkg:smollm2")
        base = dict(dataset=str(dataset), top_k=64, max_new_tokens=args.max_new_tokens, temperature=0.7,
                    batch_size=8, progress=False)

        tiny = tiny_model_for(tokenizer, seed=0)
        results["hf_tiny_k64"] = run(TeacherCacheConfig(out=work / "tiny", teacher="tiny",
                                                        teacher_tokenizer="pkg:smollm2", **base), model=tiny)
        print("hf tiny:", results["hf_tiny_k64"], file=sys.stderr)

        started = time.perf_counter()
        teacher = load_model(TEACHER)
        results["smollm2_load_s"] = round(time.perf_counter() - started, 2)
        # K = 256 stored so that the loss deviation can also be read at K = 256 (slices give K = 16, 64)
        results["hf_smollm2"] = run(TeacherCacheConfig(out=work / "smol", teacher=TEACHER, **{**base, "top_k": 256}),
                                    model=teacher)
        print("hf smollm2:", results["hf_smollm2"], file=sys.stderr)
        results["hf_smollm2_passes_k64"] = bench_passes(teacher, tokenizer, args.prompts, args.max_new_tokens, 64,
                                                        args.pass_repeats)
        print("hf smollm2 single vs two pass:", results["hf_smollm2_passes_k64"], file=sys.stderr)

        results["bytes_per_teacher_token"] = {
            f"k{k}": {"uncompressed": bytes_per_teacher_token(k), "parquet_zstd": round(disk_bytes_at_k(work / "smol", k, work), 1)}
            for k in (16, 64, 256)
        }
        print("bytes:", results["bytes_per_teacher_token"], file=sys.stderr)

        results["loss_topk_deviation"] = loss_deviation(work / "smol", teacher, [16, 64, 256])
        print("loss deviation:", results["loss_topk_deviation"], file=sys.stderr)

        if not args.no_server:
            results["openai_llama_cpp_k64"] = bench_openai(dataset, work, args.max_new_tokens, 64)
            print("openai llama.cpp:", results["openai_llama_cpp_k64"], file=sys.stderr)
        results["vllm"] = "not measured: no GPU on this machine (vLLM has no CPU build)"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
