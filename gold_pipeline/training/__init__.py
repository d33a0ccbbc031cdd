"""Online GOLD training: `GOLDConfig` (TRL's GOLD fields on TrainingArguments) and `GOLDTrainer`."""

from gold_pipeline.training.config import GOLDConfig
from gold_pipeline.training.trainer import GOLDTrainer

__all__ = ["GOLDConfig", "GOLDTrainer"]
