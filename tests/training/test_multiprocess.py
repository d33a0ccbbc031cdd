"""Two processes (accelerate launch, gloo on CPU) with gradient accumulation 1 equal one process with
accumulation 2: same window losses, grad norms and updated weights (the loss is normalized over the window's
counts summed across processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parents[1]


def _run(cmd: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("lmbda", [0.0])
def test_two_processes_equal_one_process_with_accumulation(tmp_path, lmbda):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    script = str(TESTS / "ddp_script.py")
    single = _run([sys.executable, script, str(one), "2", str(lmbda)], one)
    double = _run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", script, str(two), "1", str(lmbda)],
                  two)
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert double["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-3)
    for name, value in single["weights"].items():
        assert double["weights"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert double["lm_head"] == pytest.approx(single["lm_head"], rel=1e-4, abs=1e-6)
