"""`gold teacher-cache --executor ray` (an actor pool, one task per shard): the same rows as the local executor; an
actor killed mid-run stops the run resumably and `--resume` gives the same rows, none lost or doubled; an
unreachable --ray-address is a clear error naming it. Clusters run loopback-only (tests/ray_helpers.py)."""

import subprocess
import time

import numpy as np
import pytest

from gold_pipeline.data.shards import read_manifest
from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
from gold_pipeline.teacher_cache.ray_executor import actor_options
from tests.ray_helpers import GOLD, REPO, gold_env, kill_a_worker_mid_run, loopback_only
from tests.teacher_cache.test_job import PROMPTS, TOKENIZER, read_rows, write_jsonl

OPTIONS = dict(teacher_tokenizer=TOKENIZER, top_k=4, max_new_tokens=6, rows_per_shard=1, batch_size=1,
               max_context=512, progress=False)


def _cmd(dataset, out, model_dir, *extra: str) -> list[str]:
    return [*GOLD, "teacher-cache", "--dataset", str(dataset), "--out", str(out), "--teacher", str(model_dir),
            "--teacher-tokenizer", TOKENIZER, "--top-k", "4", "--max-new-tokens", "6", "--rows-per-shard", "1",
            "--batch-size", "1", "--max-context", "512", "--no-progress", *extra]


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b]
    for x, y in zip(a, b):
        for key in ("teacher_completion_ids", "teacher_topk_ids", "completion_text", "finish_reason"):
            assert x[key] == y[key], key
        np.testing.assert_allclose(np.asarray(x["teacher_topk_logprobs"], dtype=np.float64),
                                   np.asarray(y["teacher_topk_logprobs"], dtype=np.float64), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_ray_actor_pool_writes_the_same_rows_as_the_local_executor(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    run_teacher_cache(TeacherCacheConfig(dataset=str(dataset), out=tmp_path / "local", teacher=str(tiny_model_dir),
                                         **OPTIONS))
    done = subprocess.run(loopback_only(_cmd(dataset, tmp_path / "ray", tiny_model_dir, "--executor", "ray",
                                             "--num-workers", "2")),
                          cwd=REPO, env=gold_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ray", kind="teacher")
    assert manifest["num_shards"] == len(PROMPTS) and manifest["config"]["executor"] == "ray"
    _same_rows(read_rows(tmp_path / "ray"), read_rows(tmp_path / "local"))


@pytest.mark.slow
def test_ray_actor_killed_mid_run_then_resume_gives_the_same_rows(tmp_path, tiny_model_dir):
    prompts = [{"prompt": f"Question number {i}: what is {i} + {i}?"} for i in range(8)]
    dataset = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "killed"
    env = gold_env(GOLD_TEACHER_CACHE_TEST_SHARD_DELAY="1.5")
    code, stderr = kill_a_worker_mid_run(_cmd(dataset, out, tiny_model_dir, "--executor", "ray", "--num-workers", "2"),
                                         env, out, "TeacherShardWorker")
    assert code == 1, stderr[-3000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert 1 <= len(list((out / "_gold" / "done").glob("*.json"))) < 8 and not (out / "manifest.json").exists()
    resumed = subprocess.run(loopback_only(_cmd(dataset, out, tiny_model_dir, "--executor", "ray", "--num-workers",
                                                "2", "--resume")),
                             cwd=REPO, env=gold_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_teacher_cache(TeacherCacheConfig(dataset=str(dataset), out=tmp_path / "clean", teacher=str(tiny_model_dir),
                                         **OPTIONS))
    rows, clean = read_rows(out), read_rows(tmp_path / "clean")
    assert len({r["sample_id"] for r in rows}) == len(rows) == len(clean) == 8  # none lost, none doubled
    _same_rows(rows, clean)
    assert not list(out.glob(".*.tmp"))


def test_unreachable_ray_address_is_a_clear_error(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    dataset = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    started = time.monotonic()
    done = subprocess.run(_cmd(dataset, tmp_path / "out", tiny_model_dir, "--executor", "ray", "--ray-address",
                               "127.0.0.1:9"), cwd=REPO, env=gold_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Cannot reach the Ray cluster at 127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


def test_actors_ask_for_gpus_only_when_the_cluster_has_them(tmp_path):
    cfg = TeacherCacheConfig(dataset="d.jsonl", out=tmp_path, teacher="t", executor="ray", num_workers=2)
    assert "num_gpus" not in actor_options(cfg, 0) and actor_options(cfg, 0)["max_restarts"] == 0
    assert actor_options(cfg, 8)["num_gpus"] == 1
    vllm = TeacherCacheConfig(dataset="d.jsonl", out=tmp_path, teacher="t", executor="ray", backend="vllm",
                              tensor_parallel_size=2)
    assert actor_options(vllm, 8)["num_gpus"] == 2
