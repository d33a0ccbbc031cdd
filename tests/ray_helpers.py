"""Running `gold ... --executor ray` in tests: Ray's servers listen on every interface (its gRPC servers bind
0.0.0.0, with no option to change it), so every test that starts a Ray cluster runs the command inside a
loopback-only network namespace (`unshare -rn`, lo up): the cluster is reachable from 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLD = [sys.executable, "-m", "gold_pipeline.cli"]


def loopback_only(cmd: list[str]) -> list[str]:
    """`cmd` inside a new network namespace that has only the loopback interface (skips the test if impossible)."""
    pytest.importorskip("ray")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip for a loopback-only network namespace (Ray listens on all interfaces)")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode()[-200:]}")
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "--", *cmd]


def gold_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def ray_worker_pids(task_name: str) -> list[int]:
    """Ray worker processes running `task_name` now (Ray titles them `ray::<task name>`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::{task_name}"):
            pids.append(int(proc.name))
    return pids


def kill_a_worker_mid_run(cmd: list[str], env: dict[str, str], out: Path, task_name: str,
                          timeout_s: float = 240) -> tuple[int, str]:
    """Start `cmd` (loopback-only), wait until it wrote a shard and a Ray worker runs `task_name`, SIGKILL that worker;
    returns the command's exit code and stderr."""
    process = subprocess.Popen(loopback_only(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        markers = out / "_gold" / "done"
        deadline = time.monotonic() + timeout_s
        victims: list[int] = []
        while time.monotonic() < deadline and process.poll() is None:
            victims = ray_worker_pids(task_name) if list(markers.glob("*.json")) else []
            if victims:
                break
            time.sleep(0.1)
        assert victims, f"no Ray worker running {task_name} was seen after a shard was written"
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr
