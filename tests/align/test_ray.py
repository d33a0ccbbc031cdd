"""`gold align --executor ray`: the same shards as the local executor; a Ray worker killed mid-run stops the run
resumably and `--resume` gives the same rows, none lost or doubled; an unreachable --ray-address is a clear error
naming it, in bounded time. Clusters run in a loopback-only network namespace (tests/ray_helpers.py)."""

import json
import socket
import subprocess
import time

import polars as pl
import pytest

from gold_pipeline.align.config import AlignConfig
from gold_pipeline.align.job import run_align
from gold_pipeline.data import shards
from tests.helpers import DEMO_DATA
from tests.ray_helpers import GOLD, REPO, gold_env, kill_a_worker_mid_run, loopback_only

DEMO = str(DEMO_DATA / "train.jsonl")  # 52 rows
PAIR = ["--student-tokenizer", "pkg:mistral-sp-v1", "--teacher-tokenizer", "pkg:mistral-sp-v1"]  # small, fast


def _align_cmd(out, *extra: str) -> list[str]:
    return [*GOLD, "align", "--dataset", DEMO, *PAIR, "--out", str(out), "--shard-size", "7", "--no-progress", *extra]


def _local(out) -> None:
    run_align(AlignConfig(out=str(out), dataset=DEMO, student_tokenizer="pkg:mistral-sp-v1",
                          teacher_tokenizer="pkg:mistral-sp-v1", shard_size=7, progress=False))


def _rows(out) -> pl.DataFrame:
    return pl.read_parquet(str(out / "*.parquet")).sort("row_index")


@pytest.mark.slow
def test_ray_executor_writes_the_same_shards_as_the_local_one(tmp_path):
    _local(tmp_path / "local")
    done = subprocess.run(loopback_only(_align_cmd(tmp_path / "ray", "--executor", "ray", "--num-workers", "2")),
                          cwd=REPO, env=gold_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    local, ray = (shards.read_manifest(tmp_path / name, kind="aligned") for name in ("local", "ray"))
    assert ray["num_shards"] == local["num_shards"] == 8
    assert [s["sha256"] for s in ray["shards"]] == [s["sha256"] for s in local["shards"]]
    assert ray["files"]["vocab_map_sha256"] == local["files"]["vocab_map_sha256"]
    assert ray["config"]["executor"] == "ray" and ray["stats"]["rows"] == local["stats"]["rows"] == 52
    assert _rows(tmp_path / "ray").equals(_rows(tmp_path / "local"))


@pytest.mark.slow
def test_ray_worker_killed_mid_run_then_resume_gives_the_same_rows(tmp_path):
    out = tmp_path / "killed"
    env = gold_env(GOLD_ALIGN_TEST_SHARD_DELAY="1.5")  # each task sleeps after writing its shard
    code, stderr = kill_a_worker_mid_run(_align_cmd(out, "--executor", "ray", "--num-workers", "2"), env, out,
                                         "_ray_align_shard")
    assert code == 1, stderr[-3000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    finished = len(list((out / "_gold" / "done").glob("*.json")))
    assert 1 <= finished < 8 and not (out / "manifest.json").exists()

    resumed = subprocess.run(loopback_only(_align_cmd(out, "--executor", "ray", "--num-workers", "2", "--resume")),
                             cwd=REPO, env=gold_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _local(tmp_path / "clean")
    rows, clean = _rows(out), _rows(tmp_path / "clean")
    assert rows["sample_id"].n_unique() == rows.height == clean.height == 52  # none lost, none doubled
    assert rows.equals(clean)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == list(range(8))
    assert not list(out.glob(".*.tmp"))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the socket is


def test_unreachable_ray_address_is_a_clear_error_in_bounded_time(tmp_path):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    done = subprocess.run(_align_cmd(tmp_path / "out", "--executor", "ray", "--ray-address", address), cwd=REPO,
                          env=gold_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"Cannot reach the Ray cluster at {address}" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("options, fragment", [
    (dict(executor="dask"), "--executor must be one of"),
    (dict(ray_address="127.0.0.1:6379"), "--ray-address needs --executor ray"),
    (dict(executor="ray", ray_address="head-node"), "is not HOST:PORT"),
])
def test_executor_options_are_validated(tmp_path, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        AlignConfig(out=str(tmp_path), dataset=DEMO, student_tokenizer="pkg:mistral-sp-v1",
                    teacher_tokenizer="pkg:mistral-sp-v1", **options)
