"""Pipeline meta-training of learned optimizers (docs/paper_settings.md §2)."""

from optim4rl.meta.config import MetaConfig, MetaTask
from optim4rl.meta.pipeline import MetaTrainer, reset_offsets

__all__ = ["MetaConfig", "MetaTask", "MetaTrainer", "reset_offsets"]
