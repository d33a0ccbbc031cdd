"""Old module paths (before the stage folders) stay importable, with a DeprecationWarning.

`import gold_pipeline.alignment` returns a module whose names are looked up, on first use, in the modules that
own them now (OLD_MODULES). Nothing here is used by gold itself; new code imports from the owners.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

OLD_MODULES: dict[str, tuple[str, ...]] = {
    "gold_pipeline.tokenization": ("gold_pipeline.text.tokenizers", "gold_pipeline.text.encode",
                                   "gold_pipeline.text.packaged", "gold_pipeline.resources"),
    "gold_pipeline.byte_tables": ("gold_pipeline.text.bytes",),
    "gold_pipeline.vocab_map": ("gold_pipeline.text.vocab_map",),
    "gold_pipeline.alignment": ("gold_pipeline.align.groups", "gold_pipeline.align.batch", "gold_pipeline.text.bytes"),
    "gold_pipeline.align_job": ("gold_pipeline.align.config", "gold_pipeline.align.job", "gold_pipeline.align.row",
                                "gold_pipeline.align.shard", "gold_pipeline.text.pair", "gold_pipeline.errors"),
    "gold_pipeline.sources": ("gold_pipeline.data.sources", "gold_pipeline.data.records", "gold_pipeline.errors"),
    "gold_pipeline.shards": ("gold_pipeline.data.shards", "gold_pipeline.errors"),
    "gold_pipeline.schemas": ("gold_pipeline.data.schemas",),
    "gold_pipeline.demo": ("gold_pipeline.recipes.demo",),
    "gold_pipeline.report": ("gold_pipeline.recipes.report",),
    "gold_pipeline.inspect": ("gold_pipeline.recipes.inspect",),
    "gold_pipeline.training.data": ("gold_pipeline.training.datasets", "gold_pipeline.training.collate",
                                    "gold_pipeline.text.pair"),
}
RENAMED = {"Side": "TokenizerSide"}  # align_job.Side -> text.pair.TokenizerSide


class _Alias(types.ModuleType):
    def __init__(self, name: str, owners: tuple[str, ...]):
        super().__init__(name, f"Deprecated alias of {', '.join(owners)}.")
        self._owners = owners

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        name = RENAMED.get(attr, attr)
        for owner in self._owners:
            module = importlib.import_module(owner)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"{self.__name__}.{attr} no longer exists; look in {', '.join(self._owners)}.")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in OLD_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {', '.join(OLD_MODULES[spec.name])}; import from there.",
                      DeprecationWarning, stacklevel=3)
        return _Alias(spec.name, OLD_MODULES[spec.name])

    def exec_module(self, module) -> None:
        return None


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
