"""The package as users install it: build the wheel from a copy of the tree, install it into a fresh venv that
reuses this venv's dependencies (a .pth file, no network), and run `gold --help` and a small `gold align` from an
unrelated folder on the demo data that ships inside the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv with the built wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO / "gold_pipeline", source / "gold_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, source], root)
    wheel = next(dist.glob("gold_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gold_pipeline/recipes/demo_data/train.jsonl" in names
    assert not any(name.startswith(("cli/", "tests/", "bench/")) for name in names)  # only our own package
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root)
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     root).stdout.strip())
    # this venv's dependencies, but not its editable gold_pipeline (a plain path: its .pth files are not run)
    (site / "main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", wheel], root)
    return venv / "bin"


def test_wheel_installs_gold_with_its_demo_data(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    help_text = _run([installed / "gold", "--help"], elsewhere).stdout
    for command in ("teacher-cache", "align", "train", "inspect", "demo"):
        assert command in help_text
    where = _run([installed / "python", "-c", "import gold_pipeline, gold_pipeline.recipes.demo as d; "
                  "print(gold_pipeline.__file__); print(d.DEMO_DATA)"], elsewhere).stdout.split()
    assert not where[0].startswith(str(REPO)), "the wheel's package must be the one imported, not the checkout"
    demo_train = Path(where[1]) / "train.jsonl"
    assert demo_train.is_file()
    rows = [json.loads(line) for line in demo_train.read_text(encoding="utf-8").splitlines()[:6]]
    small = elsewhere / "small.jsonl"
    small.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    _run([installed / "gold", "align", "--dataset", small, "--student-tokenizer", "pkg:mistral-sp-v1",
          "--teacher-tokenizer", "pkg:smollm2", "--out", elsewhere / "aligned", "--no-progress"], elsewhere)
    manifest = json.loads((elsewhere / "aligned" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stats"]["rows"] == 6
    failed = subprocess.run([str(installed / "gold"), "align", "--dataset", str(elsewhere / "missing.jsonl"),
                             "--student-tokenizer", "pkg:mistral-sp-v1", "--teacher-tokenizer", "pkg:smollm2",
                             "--out", str(elsewhere / "x")], cwd=elsewhere, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
