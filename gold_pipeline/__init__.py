"""gold: cross-tokenizer, on-policy knowledge distillation (GOLD) as an offline + online pipeline."""

__version__ = "0.1.0"

from gold_pipeline import _compat

_compat.install()  # the module paths of 0.1 (gold_pipeline.alignment, ...) keep importing

__all__ = ["GOLDConfig", "GOLDTrainer", "__version__"]


def __getattr__(name: str):
    # The trainer pulls in torch/transformers; keep `import gold_pipeline` cheap for the CLI.
    if name in ("GOLDConfig", "GOLDTrainer"):
        from gold_pipeline.training import GOLDConfig, GOLDTrainer

        return {"GOLDConfig": GOLDConfig, "GOLDTrainer": GOLDTrainer}[name]
    raise AttributeError(f"module 'gold_pipeline' has no attribute {name!r}")
